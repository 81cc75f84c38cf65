//! The command line, on clap: `--help` on every command, defaults shown, and a user's mistake
//! reported in one line (clap's usage error, exit status 2), never a backtrace. An option given
//! twice takes its last value, so scripts can override what they put first.

use std::path::PathBuf;

use clap::{Args as ClapArgs, CommandFactory, Parser, Subcommand, ValueEnum};
use ferry::prepager::PolicyKind;
use ferry_transport::Backing;

use crate::guest::Workload;
use crate::{Args, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-vmm",
    version,
    about = "ferry's reference VMM: runs a KVM guest whose workload runs at CPL3, and migrates, snapshots and restores it with ferry",
    after_help = "The guest checks its own memory after every migration and restore. `ferry-vmm demo --mem 2G --workload rand-write` is the README's first command."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prints a completion script for SHELL (e.g. `ferry-vmm completions bash > /etc/bash_completion.d/ferry-vmm`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Runs the workload for --seconds and has the guest check its memory.
    #[command(args_override_self = true)]
    Run {
        #[command(flatten)]
        guest: GuestOpts,
    },
    /// Migrates a guest to a second VM in this process (tcp loopback or the local transport).
    #[command(args_override_self = true)]
    Demo {
        #[command(flatten)]
        guest: GuestOpts,
        #[command(flatten)]
        migration: MigrationOpts,
    },
    /// Boots a guest, runs it for --seconds, and migrates it to a `receive` waiting at --to.
    #[command(args_override_self = true)]
    Migrate {
        /// Where `ferry-vmm receive` listens (HOST:PORT).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        key: KeyOpts,
        #[command(flatten)]
        guest: GuestOpts,
        #[command(flatten)]
        migration: MigrationOpts,
    },
    /// Waits for a source (`ferry-vmm migrate`), builds the VM it describes and receives its guest.
    #[command(args_override_self = true)]
    Receive {
        /// Address to wait on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        #[command(flatten)]
        key: KeyOpts,
        /// tcp lanes over TLS 1.3 (tls), or in plaintext (off); as the source.
        #[arg(long, value_enum, default_value_t = EncryptionArg::Tls)]
        encryption: EncryptionArg,
        /// Post-copy: draw the run into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
        /// Print the report as one JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        protect: ProtectOpts,
    },
    /// Runs a guest for --seconds, pauses it and saves it in ferry's image format.
    #[command(args_override_self = true)]
    Snapshot {
        /// The image to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        guest: GuestOpts,
    },
    /// Restores an image eagerly or lazily and has the guest check its memory.
    #[command(args_override_self = true)]
    Restore {
        /// The image to restore.
        #[arg(long)]
        from: PathBuf,
        /// Read every page before the guest runs (the default is lazy: run at once).
        #[arg(long)]
        eager: bool,
        /// Run at once while the image's pages fault in behind the guest (the default).
        #[arg(long, conflicts_with = "eager")]
        lazy: bool,
        /// What a lazy restore fetches besides the faults: demand, push or bubbling.
        #[arg(long, default_value = "bubbling", value_parser = parse_policy)]
        prepager: PolicyKind,
        /// Keep the order of the guest's first faults beside the image (FILE.ws).
        #[arg(long)]
        record: bool,
        /// Fetch the working set recorded beside the image first.
        #[arg(long)]
        replay: bool,
        /// Guest memory backing (hugetlb for an image of 2 MiB pages).
        #[arg(long, value_enum, default_value_t = BackingArg::Anon)]
        backing: BackingArg,
        /// How long the restored guest runs before it checks its memory.
        #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
        seconds: f64,
        /// Print the report as one JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// The guest: its memory, vCPUs and workload.
#[derive(ClapArgs, Debug)]
struct GuestOpts {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, conflicts_with = "mem")]
    mem_mib: u64,
    /// Guest memory as a size (512M, 2G); instead of --mem-mib.
    #[arg(long, value_parser = parse_size)]
    mem: Option<u64>,
    /// MiB the workload touches (default: half the memory).
    #[arg(long)]
    data_mib: Option<u64>,
    /// vCPUs, each running the workload over its own share of the data.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=crate::vm::MAX_VCPUS as u64))]
    vcpus: u64,
    /// Guest memory backing: anonymous, a memfd (filled in place), or 2 MiB hugetlbfs pages.
    #[arg(long, value_enum, default_value_t = BackingArg::Anon)]
    backing: BackingArg,
    /// What the guest runs: idle, seq-write, rand-write, read-mostly, hot-set or phased.
    #[arg(long, default_value = "seq-write", value_parser = parse_workload)]
    workload: Workload,
    /// A flat binary guest of your own instead of a generated workload.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Cap the workload's writes at this many MiB/s.
    #[arg(long)]
    rate_mib: Option<f64>,
    /// phased: how long each heavy (writing, unmarked) phase lasts [default: 300].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    heavy_ms: Option<u64>,
    /// phased: how long each quiet (marked as cheap to stop) phase lasts [default: 100].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    quiet_ms: Option<u64>,
    /// Length of each phase (warm-up, steady rate, after the migration), in seconds.
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Print the report as one JSON line.
    #[arg(long)]
    json: bool,
}

/// How the guest moves.
#[derive(ClapArgs, Debug)]
struct MigrationOpts {
    /// Post-copy (resume at once, memory behind), pre-copy (rounds, then a short stop), hybrid, or
    /// ft (a fault-tolerant pair: the destination is a backup that takes over if the source dies).
    #[arg(long, value_enum, default_value_t = Mode::Postcopy)]
    mode: Mode,
    /// What post-copy fetches besides the faults: demand, push or bubbling.
    #[arg(long, default_value = "bubbling", value_parser = parse_policy)]
    prepager: PolicyKind,
    /// Pre-copy stops the guest once the predicted downtime is at most this.
    #[arg(long, default_value_t = 50)]
    downtime_ms: u64,
    /// Pre-copy stops the guest after this many rounds whatever the prediction.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    max_rounds: u32,
    /// tcp (loopback), or local (the destination maps the source's memfd; memfd or hugetlb only).
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    /// tcp lanes over TLS 1.3 (tls), or in plaintext (off: for a link that is already private);
    /// both hosts must agree.
    #[arg(long, value_enum, default_value_t = EncryptionArg::Tls)]
    encryption: EncryptionArg,
    /// Post-copy: draw the run (guest rate, memory present, bandwidth by lane, fault latencies)
    /// into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
    /// Fault injection: cut-lanes=N breaks the data lanes N times during a tcp post-copy;
    /// kill-destination=F (demo) runs the destination as its own process and SIGKILLs it once
    /// that fraction of the pages has crossed: the source restarts the guest; kill-primary=S
    /// (demo --mode ft) runs the primary as its own process and SIGKILLs it S seconds into
    /// protection: the backup takes over; kill-backup=S (demo --mode ft) runs each backup as its
    /// own process and SIGKILLs the first S seconds into protection: the primary makes a new
    /// backup by a live copy and protection resumes.
    #[arg(long, value_parser = parse_inject)]
    inject: Option<Inject>,
    /// Post-copy: the destination sends reverse checkpoints this often (0: none; a destination
    /// that dies then loses the guest). Default 100, and 0 with --trips.
    #[arg(long)]
    checkpoint_ms: Option<u64>,
    /// Back-and-forth (demo): move the guest this many times between two hosts; the host it
    /// left keeps its image and each return moves only what the guest changed since.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    trips: u64,
    /// With --trips: the guest writes this percentage of its memory (its data pages, instead of
    /// --data-mib) over and over: what it changes between trips.
    #[arg(long, value_parser = parse_percent, conflicts_with = "data_mib")]
    dirty_percent: Option<f64>,
    /// With --trips: write every 16th page of the kept image before each return (the return
    /// must refuse it and run in full).
    #[arg(long)]
    tamper_kept: bool,
    /// Pre-copy and hybrid: stop the guest only inside the segments it marks as cheap to stop
    /// (task-guided), waiting for one at most --task-wait-ms.
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    task_guided: OnOff,
    /// With --task-guided on: how long past the first possible stop to wait for a segment.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    task_wait_ms: u64,
    /// How long a broken lane may take to come back before the session fails (and, with
    /// checkpoints, the source restarts the guest).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    recovery_window_ms: u64,
    #[command(flatten)]
    protect: ProtectOpts,
}

/// Who may run the guest, and who watches its output.
#[derive(ClapArgs, Debug)]
struct ProtectOpts {
    /// Where the lease files live (storage both hosts see).
    #[arg(long)]
    lease_dir: Option<PathBuf>,
    /// The lease on this etcd cluster (http://HOST:PORT) instead of a lease file (a ferry-vmm
    /// built with the etcd feature).
    #[arg(long)]
    etcd: Option<String>,
    /// Send the guest's output to the observer listening on this Unix socket.
    #[arg(long)]
    observe: Option<PathBuf>,
}

impl ProtectOpts {
    fn apply(self, a: &mut Args) {
        a.lease_dir = self.lease_dir.unwrap_or_else(std::env::temp_dir);
        a.etcd = self.etcd;
        a.observe = self.observe;
    }
}

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Inject {
    CutLanes(u64),
    KillDestination(f64),
    KillPrimary(f64),
    KillBackup(f64),
}

#[derive(ClapArgs, Debug)]
struct KeyOpts {
    /// The pre-shared key, 64 hex digits (or set FERRY_KEY).
    #[arg(long)]
    key_hex: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EncryptionArg {
    Tls,
    Off,
}

impl EncryptionArg {
    fn resolve(self) -> ferry_transport::tcp::Encryption {
        match self {
            EncryptionArg::Tls => ferry_transport::tcp::Encryption::Tls,
            EncryptionArg::Off => ferry_transport::tcp::Encryption::Off,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BackingArg {
    Anon,
    Memfd,
    Hugetlb,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TransportArg {
    Tcp,
    Local,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::parse_size(s).map_err(|e| format!("{e:#}"))
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?}: a number of seconds above 0, at most 3600")),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 100.0 => Ok(v),
        _ => Err(format!("{s:?}: a percentage above 0, at most 100")),
    }
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse()
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    s.parse()
}

fn parse_inject(s: &str) -> Result<Inject, String> {
    match s.split_once('=') {
        Some(("cut-lanes", n)) => {
            n.parse().map(Inject::CutLanes).map_err(|_| format!("cut-lanes={n}: a number of cuts"))
        }
        Some(("kill-destination", f)) => match f.parse::<f64>() {
            Ok(f) if (0.0..1.0).contains(&f) => Ok(Inject::KillDestination(f)),
            _ => Err(format!("kill-destination={f}: the fraction of pages arrived, from 0 up to 1")),
        },
        Some(("kill-primary", t)) => match t.parse::<f64>() {
            Ok(t) if (0.0..=3600.0).contains(&t) => Ok(Inject::KillPrimary(t)),
            _ => Err(format!("kill-primary={t}: seconds into protection, 0 to 3600")),
        },
        Some(("kill-backup", t)) => match t.parse::<f64>() {
            Ok(t) if (0.0..=3600.0).contains(&t) => Ok(Inject::KillBackup(t)),
            _ => Err(format!("kill-backup={t}: seconds into protection, 0 to 3600")),
        },
        _ => Err(format!("{s:?}: cut-lanes=N, kill-destination=F, kill-primary=S or kill-backup=S")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl From<BackingArg> for Backing {
    fn from(b: BackingArg) -> Backing {
        match b {
            BackingArg::Anon => Backing::Anonymous,
            BackingArg::Memfd => Backing::Memfd,
            BackingArg::Hugetlb => Backing::HugetlbMemfd,
        }
    }
}

impl GuestOpts {
    fn apply(self, a: &mut Args) {
        a.mem_mib = self.mem.unwrap_or(self.mem_mib);
        a.data_mib = self.data_mib;
        a.vcpus = self.vcpus as usize;
        a.backing = self.backing.into();
        a.workload = self.workload;
        a.guest_file = self.guest;
        a.rate_mib = self.rate_mib;
        a.heavy_ms = self.heavy_ms;
        a.quiet_ms = self.quiet_ms;
        a.seconds = self.seconds;
        a.json = self.json;
    }
}

impl MigrationOpts {
    fn apply(self, a: &mut Args) {
        a.mode = self.mode;
        a.prepager = self.prepager;
        a.downtime_ms = self.downtime_ms;
        a.max_rounds = self.max_rounds;
        a.local = matches!(self.transport, TransportArg::Local);
        a.encryption = self.encryption.resolve();
        a.plot = self.plot;
        a.cut_lanes = match self.inject {
            Some(Inject::CutLanes(n)) => n,
            _ => 0,
        };
        a.kill_destination = match self.inject {
            Some(Inject::KillDestination(f)) => Some(f),
            _ => None,
        };
        a.kill_primary = match self.inject {
            Some(Inject::KillPrimary(t)) => Some(t),
            _ => None,
        };
        a.kill_backup = match self.inject {
            Some(Inject::KillBackup(t)) => Some(t),
            _ => None,
        };
        a.checkpoint_ms = self.checkpoint_ms.unwrap_or(if self.trips > 1 { 0 } else { 100 });
        a.trips = self.trips;
        a.dirty_percent = self.dirty_percent;
        a.tamper_kept = self.tamper_kept;
        a.task_guided = self.task_guided == OnOff::On;
        a.task_wait_ms = self.task_wait_ms;
        a.recovery_window_ms = self.recovery_window_ms;
        self.protect.apply(a);
    }
}

/// The command line, parsed (clap prints help and usage errors itself, and exits).
pub fn parse() -> Args {
    let mut a = Args::default();
    match Cli::parse().command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ferry-vmm", &mut std::io::stdout());
            std::process::exit(0);
        }
        Command::Run { guest } => {
            a.command = "run".into();
            guest.apply(&mut a);
        }
        Command::Demo { guest, migration } => {
            a.command = "demo".into();
            guest.apply(&mut a);
            migration.apply(&mut a);
        }
        Command::Migrate { to, key, guest, migration } => {
            a.command = "migrate".into();
            a.to = Some(to);
            a.key_hex = key.key_hex;
            guest.apply(&mut a);
            migration.apply(&mut a);
        }
        Command::Receive { listen, key, encryption, plot, json, protect } => {
            a.command = "receive".into();
            a.plot = plot;
            a.listen = Some(listen);
            a.key_hex = key.key_hex;
            a.encryption = encryption.resolve();
            a.json = json;
            protect.apply(&mut a);
        }
        Command::Snapshot { out, guest } => {
            a.command = "snapshot".into();
            a.out = Some(out);
            guest.apply(&mut a);
        }
        Command::Restore { from, eager, lazy: _, prepager, record, replay, backing, seconds, json } => {
            a.command = "restore".into();
            a.from = Some(from);
            a.lazy = !eager;
            a.prepager = prepager;
            a.record = record;
            a.replay = replay;
            a.backing = backing.into();
            a.seconds = seconds;
            a.json = json;
        }
    }
    if let Err(why) = combination(&a) {
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, why).exit();
    }
    a
}

/// Options that clap accepts one by one but that make no sense together: refused before anything
/// starts, as a usage error, rather than one of them silently doing nothing.
fn combination(a: &Args) -> Result<(), &'static str> {
    if a.trips > 1 {
        if a.command != "demo" {
            return Err("--trips runs in demo (both hosts are this process)");
        }
        if a.local
            || a.cut_lanes > 0
            || a.kill_destination.is_some()
            || a.kill_primary.is_some()
            || a.kill_backup.is_some()
        {
            return Err("--trips runs over tcp without fault injection");
        }
        if a.checkpoint_ms > 0 {
            return Err("--trips moves post-copy without reverse checkpoints: drop --checkpoint-ms");
        }
        if a.mode == Mode::Ft {
            return Err("--trips moves the guest, --mode ft protects it in place: pick one");
        }
    } else if a.dirty_percent.is_some() || a.tamper_kept {
        return Err("--dirty-percent and --tamper-kept shape a back-and-forth: add --trips 2 or more");
    }
    if a.task_guided && !matches!(a.mode, Mode::Precopy | Mode::Hybrid) {
        return Err("--task-guided on steers pre-copy's stop: use --mode precopy or hybrid");
    }
    if (a.heavy_ms.is_some() || a.quiet_ms.is_some()) && (a.workload != Workload::Phased || a.guest_file.is_some()) {
        return Err("--heavy-ms and --quiet-ms shape --workload phased");
    }
    Ok(())
}
