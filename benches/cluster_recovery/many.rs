//! `--nodes N`: N nodes join at once, write disjoint ranges, node 1 dies, the rest recover.
//!
//! All N `serve` processes are spawned together (the clock starts just before the
//! first spawn). A thread per node waits for its socket, connects a libblkio client
//! and reads 4 KiB: a node's *join time* is the time from the start to that first
//! read's answer (the socket is bound before the node joins; it answers once the
//! node has claimed a slot, assembled, merged the free slots' bits and serves).
//!
//! Node 1 owns the first `--dirty-mib` MiB; the rest of the array is cut into N − 1
//! disjoint ranges, one per other node. Once every node serves, each writes a small
//! burst (one 4 KiB block into each of up to `--burst` chunks of its range, default 8,
//! setting its own bits) and node 1 one 4 KiB block into each of its chunks. `--writers K` survivors,
//! spread over the nodes (2, …), then write 4 KiB blocks at random offsets of their
//! range at depth `--qd` for `--seconds` (baseline), node 1 is killed with SIGKILL,
//! and they go on writing until node 1's chunks are resynced. (32 clients at QD 8 on
//! two cores would measure the machine, not the cluster; the other survivors keep
//! their client connected and idle.)
//!
//! The end of the recovery is seen on the survivors' control sockets: *resynced*
//! when the survivors copied node 1's chunks (bytes copied since the kill ≥ its dirty
//! chunks, no resync running nor pending), *settled* when, besides, no survivor
//! keeps its reads on one leg (each has seen the slot recovered) and the recovered
//! slot is free again (a survivor watches it only once a node holds it).

use super::*;
use std::sync::Barrier;
use vhost_user_md::serve::control::{request, Request, Status};

/// One node's process, sockets and range.
struct Member {
    child: Child,
    sock: PathBuf,
    ctl: PathBuf,
    log: PathBuf,
    lo: u64,
    hi: u64,
}

fn status_of(ctl: &Path) -> Option<Status> {
    request(ctl, &Request::Status).ok()?.status
}

/// Writes one 4 KiB block at the start of each chunk in `[lo, hi)`, at most `most`
/// chunks spread over the range.
fn burst(c: &mut Client, lo: u64, hi: u64, most: u64, qd: usize) {
    let chunks = (hi - lo) / MIB;
    let n = chunks.min(most);
    if n == 0 {
        return;
    }
    let offsets: Vec<u64> = (0..n).map(|i| lo + i * chunks / n * MIB).collect();
    write_all(c, &offsets, BS, qd);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn many_nodes(o: &Opts, d: &Path, legs: &[PathBuf], lockd_sock: &Path) {
    let n = o.nodes;
    let dirty = o.dirty_mib * MIB;
    // Node 1: [0, dirty); the others share [dirty, size) in whole MiB.
    let per = (o.size_mib - o.dirty_mib) / (n as u64 - 1) * MIB;
    let range = |i: usize| {
        if i == 0 {
            (0, dirty)
        } else {
            let lo = dirty + (i as u64 - 1) * per;
            (lo, lo + per)
        }
    };
    let writers: Vec<usize> = (0..o.writers)
        .map(|k| 1 + k * (n - 1) / o.writers)
        .collect();
    let t0 = Instant::now();
    let mut members: Vec<Member> = (0..n)
        .map(|i| {
            let sock = d.join(format!("n{}.sock", i + 1));
            let log = d.join(format!("n{}.log", i + 1));
            let out = std::fs::File::create(&log).unwrap();
            let child = bin()
                .arg("serve")
                .arg("--socket")
                .arg(&sock)
                .arg("--lock-manager")
                .arg(format!("lockd:{}", lockd_sock.display()))
                .arg("--shared-writes")
                .args(legs)
                .env("RUST_LOG", &o.log)
                .stdout(Stdio::null())
                .stderr(out)
                .spawn()
                .unwrap();
            let (lo, hi) = range(i);
            Member {
                child,
                ctl: PathBuf::from(format!("{}.ctl", sock.display())),
                sock,
                log,
                lo,
                hi,
            }
        })
        .collect();
    let spawned = t0.elapsed();

    let all_joined = Arc::new(Barrier::new(n + 1));
    let bursts_done = Arc::new(Barrier::new(n + 1));
    let base_done = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (sock, log, lo, hi) = (m.sock.clone(), m.log.clone(), m.lo, m.hi);
            let (all_joined, bursts_done) = (all_joined.clone(), bursts_done.clone());
            let (base_done, done) = (base_done.clone(), done.clone());
            let writer = writers.contains(&i);
            let (qd, dirty_mib, most) = (o.qd, o.dirty_mib, o.burst);
            std::thread::spawn(move || {
                while !sock.exists() {
                    assert!(
                        t0.elapsed() < Duration::from_secs(120),
                        "node {} has no socket: {}",
                        i + 1,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                let mut c = connect(&sock, qd);
                let mut comps: Vec<MaybeUninit<blkio::Completion>> = vec![MaybeUninit::uninit()];
                c.q.read(lo, c.base as *mut u8, BS, 0, blkio::ReqFlags::empty());
                let got = c.q.do_io(&mut comps, 1, None, None).expect("do_io");
                assert_eq!(got, 1);
                // SAFETY: do_io initialised the first completion.
                let cp = unsafe { comps[0].as_ptr().read() };
                assert_eq!(cp.ret, 0, "node {}: first read failed", i + 1);
                let joined = t0.elapsed();
                all_joined.wait();
                if i == 0 {
                    burst(&mut c, lo, hi, dirty_mib, qd);
                } else {
                    burst(&mut c, lo, hi, most, qd);
                }
                bursts_done.wait();
                if i == 0 {
                    // Node 1 dies with its bits set.
                    return (joined, None);
                }
                if !writer {
                    while !done.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return (joined, None);
                }
                let t = Instant::now();
                let base = write_until(&mut c, lo, hi, qd, &|| base_done.load(Ordering::SeqCst));
                let base_secs = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let (during, worst) =
                    write_until_worst(&mut c, lo, hi, qd, &|| done.load(Ordering::SeqCst));
                let during_secs = t.elapsed().as_secs_f64();
                (joined, Some((base, base_secs, during, during_secs, worst)))
            })
        })
        .collect();
    all_joined.wait();
    let joined_all = t0.elapsed();
    bursts_done.wait();

    // The nodes' slots, and node 1's dirty bits, before the kill.
    let before: Vec<Status> = members
        .iter()
        .map(|m| status_of(&m.ctl).expect("status"))
        .collect();
    let victim_slot = before[0].node_slot;
    let mut slots: Vec<u32> = before.iter().map(|s| s.node_slot).collect();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), n, "two nodes share a slot");
    std::thread::sleep(Duration::from_secs(o.seconds));
    base_done.store(true, Ordering::SeqCst);
    // Its bits as they are at the kill (lazily cleared ones are not resynced).
    let victim_dirty = status_of(&members[0].ctl).expect("status").bitmap_dirty;

    let ctls: Vec<PathBuf> = members[1..].iter().map(|m| m.ctl.clone()).collect();
    let copied0: Vec<u64> = before[1..].iter().map(|s| s.resync.bytes_copied).collect();
    let want = victim_dirty * MIB;
    let d2 = done.clone();
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        let mut resynced = None;
        loop {
            let all: Vec<Option<Status>> = ctls.iter().map(|c| status_of(c)).collect();
            let copied: Vec<u64> = all
                .iter()
                .zip(&copied0)
                .map(|(s, c0)| s.as_ref().map_or(0, |s| s.resync.bytes_copied - c0))
                .collect();
            let idle = all.iter().all(|s| {
                s.as_ref()
                    .is_some_and(|s| !s.resync.active && s.resync.remaining_chunks == 0)
            });
            if resynced.is_none() && copied.iter().sum::<u64>() >= want && idle {
                resynced = Some(t.elapsed());
                d2.store(true, Ordering::SeqCst);
            }
            let one_leg: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.as_ref()
                        .is_none_or(|s| s.cluster.as_ref().is_none_or(|c| c.reads_from_one_leg))
                })
                .map(|(i, _)| i + 2)
                .collect();
            if let Some(r) = resynced {
                if one_leg.is_empty() {
                    return (r, t.elapsed(), copied);
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "recovery did not end: copied {copied:?}, reads on one leg on nodes {one_leg:?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    // Slots a node took for a dead node's before anyone died (the nodes' logs at
    // info level and above name each).
    let mistaken: usize = members
        .iter()
        .map(|m| {
            std::fs::read_to_string(&m.log)
                .unwrap_or_default()
                .matches("is gone: its bitmap is ours")
                .count()
        })
        .sum();
    let killed = Instant::now();
    let killed_wall = std::time::SystemTime::now();
    members[0].child.kill().unwrap();
    members[0].child.wait().unwrap();
    let (resynced, settled, copied_by) = watcher.join().unwrap();
    let results: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();

    let mut join_times: Vec<Duration> = results.iter().map(|r| r.0).collect();
    let by_slot: Vec<(u32, Duration)> = before
        .iter()
        .map(|s| s.node_slot)
        .zip(join_times.iter().copied())
        .collect();
    join_times.sort_unstable();
    println!(
        "{n} nodes over lockd, {} MiB array, 1 MiB chunks; spawned in {:.0} ms.\n",
        o.size_mib,
        ms(spawned)
    );
    println!(
        "join (spawn of the first node to a node's first 4 KiB read answered): first {:.0} ms, median {:.0} ms, last {:.0} ms (all {n} serving at {:.0} ms)",
        ms(join_times[0]),
        ms(join_times[n / 2]),
        ms(join_times[n - 1]),
        ms(joined_all)
    );
    println!("slots taken for a dead node's before the kill (from the nodes' logs): {mistaken}");
    let mut by_slot = by_slot;
    by_slot.sort_unstable();
    println!(
        "join time by slot (ms): {}",
        by_slot
            .iter()
            .map(|(s, t)| format!("{s}:{:.0}", ms(*t)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let recovered_by: Vec<String> = copied_by
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, c)| {
            format!(
                "node {} (slot {}): {} MiB",
                i + 2,
                before[i + 1].node_slot,
                c / MIB
            )
        })
        .collect();
    println!(
        "\nnode 1 (slot {victim_slot}) killed with {victim_dirty} dirty chunks; resynced by {}",
        if recovered_by.is_empty() {
            "nobody".to_string()
        } else {
            recovered_by.join(", ")
        }
    );
    let copied: u64 = copied_by.iter().sum();
    println!(
        "recovery: {} MiB copied in {:.2} s ({:.0} MiB/s) from the kill to the end of the resync; every survivor settled (reads on both legs again) at {:.2} s\n",
        copied / MIB,
        resynced.as_secs_f64(),
        copied as f64 / MIB as f64 / resynced.as_secs_f64().max(1e-9),
        settled.as_secs_f64()
    );
    println!(
        "4 KiB random writes at QD {} in each writer's own range, {} writers:\n",
        o.qd,
        writers.len()
    );
    println!("| node, phase | writes | IOPS | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    let (mut all_base, mut all_during) = (Vec::new(), Vec::new());
    let (mut base_secs, mut during_secs) = (0f64, 0f64);
    let mut slowest = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let Some((base, bs, during, ds, worst)) = &r.1 else {
            continue;
        };
        slowest.push(format!(
            "node {} at {:.0} ms",
            i + 1,
            ms(worst.saturating_duration_since(killed))
        ));
        let who = format!("node {} (slot {})", i + 1, before[i].node_slot);
        println!("{}", summary(&format!("{who}, before"), base.clone(), *bs));
        println!(
            "{}",
            summary(&format!("{who}, during"), during.clone(), *ds)
        );
        all_base.extend_from_slice(base);
        all_during.extend_from_slice(during);
        base_secs = base_secs.max(*bs);
        during_secs = during_secs.max(*ds);
    }
    println!(
        "{}",
        summary("all writers, before the kill", all_base, base_secs)
    );
    println!(
        "{}",
        summary("all writers, during recovery", all_during, during_secs)
    );
    let since_epoch = killed_wall
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    println!(
        "\nslowest write during recovery answered (from the kill, at {}.{:03} s since the epoch): {}",
        since_epoch.as_secs(),
        since_epoch.subsec_millis(),
        slowest.join(", ")
    );
    for m in &mut members[1..] {
        // SAFETY: plain kill(2) on our children.
        unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
    }
    for m in &mut members[1..] {
        let _ = m.child.wait();
    }
}
