//! The etcd arbiter against a real single-node etcd (Debian's etcd-server, run by
//! `scripts/etcd.sh` on free ports with a scratch data directory: `ScratchEtcd`). Where the etcd binary is
//! missing each test says SKIPPED (`scripts/setup.sh` installs it; CI runs them).
#![cfg(feature = "etcd")]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::arbiter::{Arbiter, LeaseKeeper, LeaseTerms, ScratchEtcd};

fn start(test: &str) -> Option<ScratchEtcd> {
    let etcd = ScratchEtcd::start(test);
    if etcd.is_none() {
        let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: no etcd binary (apt install etcd-server)");
    }
    etcd
}

#[test]
fn contenders_racing_on_etcd_produce_exactly_one_winner_each_round() {
    let Some(etcd) = start("race") else { return };
    for round in 0..10 {
        let key = format!("/ferry/race-{round}");
        let winners: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let (etcd, key) = (&etcd, &key);
                    s.spawn(move || {
                        let arbiter = etcd.arbiter(key).unwrap();
                        arbiter.acquire(&format!("host-{i}"), Duration::from_secs(10)).unwrap().is_some()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(winners.iter().filter(|&&w| w).count(), 1, "round {round}: {winners:?}");
    }
}

#[test]
fn an_etcd_lease_hands_over_on_release_and_on_expiry_and_epochs_rise() {
    let Some(etcd) = start("handover") else { return };
    let (a, b) = (etcd.arbiter("/ferry/vm").unwrap(), etcd.arbiter("/ferry/vm").unwrap());
    let ttl = Duration::from_secs(2);
    let la = a.acquire("source", ttl).unwrap().expect("free: source takes it");
    assert!(b.acquire("destination", ttl).unwrap().is_none(), "held by source");
    assert!(b.renew("destination", ttl).unwrap().is_none(), "not destination's to renew");
    assert_eq!(a.renew("source", ttl).unwrap().expect("source renews").epoch, la.epoch);
    assert_eq!(a.current().unwrap().unwrap().holder, "source");
    a.release("source").unwrap();
    assert!(a.current().unwrap().is_none());
    let lb = b.acquire("destination", ttl).unwrap().expect("released: destination takes it");
    assert!(lb.epoch > la.epoch, "every new holder raises the epoch: {} then {}", la.epoch, lb.epoch);
    // The destination stops renewing: etcd expires its lease on its own clock.
    let deadline = Instant::now() + Duration::from_secs(15);
    let la2 = loop {
        if let Some(l) = a.acquire("source", ttl).unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "the destination's lease never expired");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(la2.epoch > lb.epoch);
    assert!(b.renew("destination", ttl).unwrap().is_none(), "lost: the destination must stop");
}

#[test]
fn a_keeper_on_etcd_renews_and_a_holder_cut_off_from_etcd_lets_go() {
    let Some(mut etcd) = start("keeper") else { return };
    let terms = |holder: &str| LeaseTerms {
        arbiter: Arc::new(etcd.arbiter("/ferry/kept").unwrap()),
        holder: holder.into(),
        ttl: Duration::from_secs(2),
        clock_skew: Duration::ZERO,
    };
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let keeper = LeaseKeeper::acquire(&terms("destination"), Duration::ZERO, move || {
        flag.store(true, Ordering::Release);
    })
    .unwrap();
    // Past its time to live, still held: the keeper renewed it.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!keeper.lost());
    let other = terms("source");
    assert!(other.arbiter.acquire("source", Duration::from_secs(2)).unwrap().is_none(), "still the destination's");
    // The arbiter goes away: the holder can no longer renew and must let go by its own clock.
    etcd.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !keeper.lost() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(keeper.lost() && lost.load(Ordering::Acquire), "a holder cut off from the arbiter stopped");
}
