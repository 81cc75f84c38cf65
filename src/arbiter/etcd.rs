//! The distributed arbiter: the lease is a key on an etcd cluster, attached to an etcd lease
//! with a time to live, taken by compare-and-swap (a transaction that puts the key only if it does
//! not exist, or holds this holder already). etcd expires it on its own clock, so hosts' clocks
//! do not matter; the key's create revision rises with every new holder and is the epoch (a
//! fencing token). Renewal keeps the etcd lease alive and checks the key is still this holder's.
//!
//! Over etcd-client (the maintained Rust client; gRPC on tokio). The [`Arbiter`] trait is
//! blocking, so each call runs on a small runtime owned by the arbiter, bounded by a timeout.
//! etcd counts time to live in whole seconds (at least its own minimum, 2 s with default
//! settings): a shorter ttl is rounded up there, while a holder's keeper keeps counting the ttl it
//! asked for, so it lets go first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::{check_holder, Arbiter, Lease};
use crate::error::{MigrationError, Result};

/// A lease on an etcd cluster (see the module doc).
pub struct EtcdArbiter {
    runtime: tokio::runtime::Runtime,
    client: Client,
    key: String,
    timeout: Duration,
    /// The etcd lease each holder on this arbiter attached its key to.
    leases: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter").field("key", &self.key).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

fn etcd(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Arbiter(format!("etcd: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl EtcdArbiter {
    /// Connects to `endpoints` (e.g. "http://10.0.0.5:2379") for the lease named `key`; every
    /// call (the connection too) gives up after `timeout`.
    pub fn connect(endpoints: &[&str], key: &str, timeout: Duration) -> Result<Self> {
        if key.is_empty() {
            return Err(MigrationError::Arbiter("an empty etcd key".into()));
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(etcd)?;
        let options = ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
        let client = runtime
            .block_on(async { tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await })
            .map_err(|_| etcd(format!("no answer from {endpoints:?} within {timeout:?}")))?
            .map_err(etcd)?;
        Ok(EtcdArbiter { runtime, client, key: key.into(), timeout, leases: Mutex::new(HashMap::new()) })
    }

    fn run<T>(&self, call: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, call).await })
            .map_err(|_| etcd(format!("no answer within {:?}", self.timeout)))?
            .map_err(etcd)
    }

    fn ttl_secs(ttl: Duration) -> i64 {
        (ttl.as_millis().div_ceil(1000) as i64).max(1)
    }

    /// The key as it stands: (holder, create revision, etcd lease).
    fn read(&self) -> Result<Option<(String, i64, i64)>> {
        let mut client = self.client.clone();
        let got = self.run(client.get(self.key.as_str(), None))?;
        Ok(got
            .kvs()
            .first()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.create_revision(), kv.lease())))
    }

    fn lease_of(&self, holder: &str) -> Option<i64> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner()).get(holder).copied()
    }
}

impl Arbiter for EtcdArbiter {
    fn acquire(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_holder(holder)?;
        let mut client = self.client.clone();
        let granted = self.run(client.lease_grant(Self::ttl_secs(ttl), None))?;
        let id = granted.id();
        // Put the key if nobody holds it, or move our own holding to the new etcd lease.
        let put = TxnOp::put(self.key.as_str(), holder, Some(PutOptions::new().with_lease(id)));
        let txn = Txn::new()
            .when([Compare::version(self.key.as_str(), CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::txn(
                Txn::new().when([Compare::value(self.key.as_str(), CompareOp::Equal, holder)]).and_then([put]),
            )]);
        let answer = self.run(client.txn(txn))?;
        let ours = answer.succeeded()
            || answer.op_responses().iter().any(|r| matches!(r, TxnOpResponse::Txn(t) if t.succeeded()));
        if !ours {
            let _ = self.run(client.lease_revoke(id));
            return Ok(None);
        }
        let previous = self.leases.lock().unwrap_or_else(|e| e.into_inner()).insert(holder.into(), id);
        if let Some(old) = previous.filter(|&old| old != id) {
            let _ = self.run(client.lease_revoke(old));
        }
        let epoch = self.read()?.map_or(0, |(_, revision, _)| revision as u64);
        Ok(Some(Lease { holder: holder.into(), epoch, expires_ms: now_ms() + granted.ttl() as u64 * 1000 }))
    }

    fn renew(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_holder(holder)?;
        let Some(id) = self.lease_of(holder) else { return Ok(None) };
        let mut client = self.client.clone();
        let alive = self.run(async {
            let (mut keeper, mut answers) = client.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            answers.message().await
        });
        let ttl_left = match alive {
            Ok(answer) => answer.map_or(0, |a| a.ttl()),
            // Expired (etcd forgot it): the holding is gone, not the arbiter.
            Err(MigrationError::Arbiter(why)) if why.contains("lease not found") => 0,
            Err(e) => return Err(e),
        };
        match self.read()? {
            Some((who, revision, lease)) if ttl_left > 0 && who == holder && lease == id => Ok(Some(Lease {
                holder: holder.into(),
                epoch: revision as u64,
                expires_ms: now_ms() + (ttl_left as u64 * 1000).min(ttl.as_millis() as u64 * 2),
            })),
            _ => Ok(None),
        }
    }

    fn release(&self, holder: &str) -> Result<()> {
        let mut client = self.client.clone();
        let txn = Txn::new()
            .when([Compare::value(self.key.as_str(), CompareOp::Equal, holder)])
            .and_then([TxnOp::delete(self.key.as_str(), None)]);
        self.run(client.txn(txn))?;
        let id = self.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(holder);
        if let Some(id) = id {
            let _ = self.run(client.lease_revoke(id));
        }
        Ok(())
    }

    fn current(&self) -> Result<Option<Lease>> {
        let Some((holder, revision, lease)) = self.read()? else { return Ok(None) };
        let mut client = self.client.clone();
        let ttl = self.run(client.lease_time_to_live(lease, None))?.ttl().max(0);
        Ok(Some(Lease { holder, epoch: revision as u64, expires_ms: now_ms() + ttl as u64 * 1000 }))
    }
}

/// A single-node etcd on free loopback ports with a scratch data directory, for tests (run by
/// `scripts/etcd.sh`; stopped and wiped when dropped). Test support, not API.
#[cfg(feature = "testkit")]
#[derive(Debug)]
pub struct ScratchEtcd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    endpoint: String,
}

#[cfg(feature = "testkit")]
impl ScratchEtcd {
    /// Starts one and waits until it answers; `None` where there is no etcd binary.
    pub fn start(name: &str) -> Option<Self> {
        use std::process::{Command, Stdio};
        Command::new("etcd").arg("--version").output().ok()?;
        let free_port = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        let (client, peer) = (free_port().ok()?, free_port().ok()?);
        let dir = std::env::temp_dir().join(format!("ferry-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/etcd.sh"))
            .arg(&dir)
            .arg(client.to_string())
            .arg(peer.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let etcd = ScratchEtcd { child, dir, endpoint: format!("http://127.0.0.1:{client}") };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if etcd.arbiter("/ferry/ready").and_then(|a| a.current()).is_ok() {
                return Some(etcd);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not come up at {}", etcd.endpoint);
    }

    /// The client URL the scratch etcd listens on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An arbiter on `key` of this etcd.
    pub fn arbiter(&self, key: &str) -> Result<EtcdArbiter> {
        EtcdArbiter::connect(&[self.endpoint.as_str()], key, Duration::from_secs(2))
    }

    /// Stops it (an arbiter gone away).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(feature = "testkit")]
impl Drop for ScratchEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
