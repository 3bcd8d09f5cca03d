//! Test client for the cluster integration tests (integration/dlm-cluster.sh): a
//! vhost-user-blk front-end (libblkio) that writes numbered, self-describing blocks,
//! records which writes were acknowledged, and verifies them later through any node.
//! Built with `cargo build --example guest_io`; never installed.
//!
//!   guest_io write TARGET --seed S --first F --blocks N [--block-size B] [--passes P] [--acks FILE]
//!       TARGET is a vhost-user socket, or a block device or file (then O_DIRECT I/O,
//!       for kernel md arrays).
//!       writes blocks F..F+N (block size B, default 64 KiB) one at a time, P passes
//!       (default 1; 0 = until killed). Each acknowledged write appends "BLOCK PASS\n" to
//!       FILE (written at once, unbuffered), so the record survives a kill.
//!   guest_io verify TARGET --seed S --first F --blocks N [--block-size B] (--acks FILE | --acked K)
//!       (--acked K: the first K writes of the sequence were acknowledged)
//!       reads blocks F..F+N back: a block whose last acknowledged write was pass p must
//!       hold pass p, or pass p+1 if it was the write in flight when the writer stopped
//!       (one write at a time, so only the write after the last acknowledged one).
//!   guest_io compare-legs LEG LEG...
//!       compares the data areas of md legs (image files or block devices).
//!   guest_io corrupt LEG MIB
//!       overwrites 64 KiB at MiB MIB of the leg's data area with garbage (so that a
//!       check of identical legs afterwards shows that this chunk was resynced).
//!
//! Block layout: "VUMDIO01", seed, block, pass (little-endian u64s), then bytes derived
//! from the same four values.

use std::collections::HashMap;
use std::io::Write;
use std::mem::MaybeUninit;
use std::process::ExitCode;

const MAGIC: &[u8; 8] = b"VUMDIO01";

fn fill(seed: u64, block: u64, pass: u64, buf: &mut [u8]) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&seed.to_le_bytes());
    buf[16..24].copy_from_slice(&block.to_le_bytes());
    buf[24..32].copy_from_slice(&pass.to_le_bytes());
    let mut x =
        seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass.wrapping_mul(0xd1b5_4a32_d192_ed03);
    for c in buf[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// What a block holds: `Some((seed, block, pass))` when it is one of ours and intact.
fn describe(buf: &[u8]) -> Option<(u64, u64, u64)> {
    if &buf[..8] != MAGIC {
        return None;
    }
    let u = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    let (s, b, p) = (u(8), u(16), u(24));
    let mut want = vec![0u8; buf.len()];
    fill(s, b, p, &mut want);
    (want == buf).then_some((s, b, p))
}

enum Client {
    Vhost(VhostClient),
    File(FileClient),
}

impl Client {
    fn open(target: &str, buf_len: usize) -> Result<Client, String> {
        use std::os::unix::fs::FileTypeExt;
        let socket = std::fs::metadata(target)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if socket {
            VhostClient::connect(target, buf_len).map(Client::Vhost)
        } else {
            FileClient::open(target, buf_len).map(Client::File)
        }
    }

    fn capacity(&self) -> u64 {
        match self {
            Client::Vhost(c) => c.capacity,
            Client::File(c) => c.capacity,
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        match self {
            Client::Vhost(c) => c.buf(),
            Client::File(c) => c.buf(),
        }
    }

    fn io(&mut self, write: bool, off: u64, len: usize) -> i32 {
        match self {
            Client::Vhost(c) => c.io(write, off, len),
            Client::File(c) => c.io(write, off, len),
        }
    }
}

/// O_DIRECT I/O on a block device or file, from a 4 KiB-aligned buffer.
struct FileClient {
    file: std::fs::File,
    buf: *mut u8,
    layout: std::alloc::Layout,
    capacity: u64,
}

impl FileClient {
    fn open(path: &str, buf_len: usize) -> Result<FileClient, String> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        let capacity = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        let layout =
            std::alloc::Layout::from_size_align(buf_len, 4096).map_err(|e| e.to_string())?;
        // SAFETY: a non-zero size (checked by the option parser).
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        if buf.is_null() {
            return Err("out of memory".into());
        }
        Ok(FileClient {
            file,
            buf,
            layout,
            capacity,
        })
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: allocated with `layout.size()` bytes, freed on drop.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.layout.size()) }
    }

    fn io(&mut self, write: bool, off: u64, len: usize) -> i32 {
        use std::os::unix::fs::FileExt;
        // SAFETY: as in `buf`; `len` is at most the buffer size.
        let b = unsafe { std::slice::from_raw_parts_mut(self.buf, len) };
        let r = if write {
            self.file.write_all_at(b, off)
        } else {
            self.file.read_exact_at(b, off)
        };
        match r {
            Ok(()) => 0,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl Drop for FileClient {
    fn drop(&mut self) {
        // SAFETY: allocated in `open` with this layout.
        unsafe { std::alloc::dealloc(self.buf, self.layout) };
    }
}

/// A virtio-blk-vhost-user front-end with one queue.
struct VhostClient {
    _blkio: blkio::Blkio,
    q: blkio::Blkioq,
    region: blkio::MemoryRegion,
    capacity: u64,
}

impl VhostClient {
    fn connect(socket: &str, buf_len: usize) -> Result<VhostClient, String> {
        let e = |what: &str, err: blkio::Error| format!("{what}: {err}");
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(|x| e("blkio", x))?;
        b.set_str("path", socket).map_err(|x| e("path", x))?;
        b.connect()
            .map_err(|x| e(&format!("connect {socket}"), x))?;
        b.set_i32("num-queues", 1).map_err(|x| e("num-queues", x))?;
        let capacity = b.get_u64("capacity").map_err(|x| e("capacity", x))?;
        let mut out = b.start().map_err(|x| e("start", x))?;
        let region = b.alloc_mem_region(buf_len).map_err(|x| e("alloc", x))?;
        b.map_mem_region(&region).map_err(|x| e("map", x))?;
        Ok(VhostClient {
            q: out.queues.remove(0),
            _blkio: b,
            region,
            capacity,
        })
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn io(&mut self, write: bool, off: u64, len: usize) -> i32 {
        let p = self.region.addr as *mut u8;
        if write {
            self.q.write(off, p, len, 0, blkio::ReqFlags::empty());
        } else {
            self.q.read(off, p, len, 0, blkio::ReqFlags::empty());
        }
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        loop {
            match self.q.do_io(&mut c, 1, None, None) {
                Ok(1) => {
                    // SAFETY: do_io initialised one completion.
                    return unsafe { c[0].as_ptr().read() }.ret;
                }
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("do_io: {e}");
                    return -libc::EIO;
                }
            }
        }
    }
}

struct Opts {
    socket: String,
    seed: u64,
    first: u64,
    blocks: u64,
    block_size: usize,
    passes: u64,
    acks: Option<String>,
    acked: Option<u64>,
}

fn opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        socket: String::new(),
        seed: 1,
        first: 0,
        blocks: 0,
        block_size: 64 * 1024,
        passes: 1,
        acks: None,
        acked: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--seed" => o.seed = num(val()?)?,
            "--first" => o.first = num(val()?)?,
            "--blocks" => o.blocks = num(val()?)?,
            "--block-size" => o.block_size = num(val()?)? as usize,
            "--passes" => o.passes = num(val()?)?,
            "--acks" => o.acks = Some(val()?),
            "--acked" => o.acked = Some(num(val()?)?),
            s if !s.starts_with("--") && o.socket.is_empty() => o.socket = s.to_string(),
            s => return Err(format!("unknown argument {s}")),
        }
    }
    if o.socket.is_empty() || o.blocks == 0 || o.block_size % 512 != 0 || o.block_size < 512 {
        return Err(
            "needs SOCKET, --blocks N > 0 and a block size that is a multiple of 512".into(),
        );
    }
    Ok(o)
}

fn write(o: &Opts) -> Result<(), String> {
    let mut c = Client::open(&o.socket, o.block_size)?;
    if (o.first + o.blocks) * o.block_size as u64 > c.capacity() {
        return Err(format!("blocks beyond the device ({} bytes)", c.capacity()));
    }
    let mut acks = match &o.acks {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("{p}: {e}"))?,
        ),
        None => None,
    };
    let mut pass = 0;
    let mut written = 0u64;
    while o.passes == 0 || pass < o.passes {
        for b in o.first..o.first + o.blocks {
            let len = o.block_size;
            fill(o.seed, b, pass, &mut c.buf()[..len]);
            let ret = c.io(true, b * len as u64, len);
            if ret != 0 {
                return Err(format!("write of block {b} (pass {pass}) failed: {ret}"));
            }
            written += 1;
            if let Some(f) = acks.as_mut() {
                f.write_all(format!("{b} {pass}\n").as_bytes())
                    .map_err(|e| format!("ack record: {e}"))?;
            }
        }
        pass += 1;
    }
    println!("wrote {written} blocks");
    Ok(())
}

fn verify(o: &Opts) -> Result<bool, String> {
    let text = match (&o.acks, o.acked) {
        (Some(path), None) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        (None, Some(k)) => (0..k)
            .map(|i| format!("{} {}\n", o.first + i % o.blocks, i / o.blocks))
            .collect(),
        _ => return Err("verify needs one of --acks FILE and --acked K".into()),
    };
    // Only complete lines count: a record cut by a kill is not an acknowledgement.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut order = Vec::new();
    for l in complete.lines() {
        let l = l.trim_matches(|c: char| c == '\r' || c.is_whitespace());
        let mut f = l.split_whitespace().map(|x| x.parse::<u64>());
        if let (Some(Ok(b)), Some(Ok(p)), None) = (f.next(), f.next(), f.next()) {
            last.insert(b, p);
            order.push((b, p));
        } else if !l.is_empty() {
            return Err(format!("bad ack record {l:?}"));
        }
    }
    // The write that may have been in flight: the one after the last acknowledged.
    let in_flight = order.last().map(|&(b, p)| {
        if b + 1 < o.first + o.blocks {
            (b + 1, p)
        } else {
            (o.first, p + 1)
        }
    });
    let mut c = Client::open(&o.socket, o.block_size)?;
    let (mut ok, mut bad, mut newer) = (0u64, 0u64, 0u64);
    for b in o.first..o.first + o.blocks {
        let Some(&p) = last.get(&b) else { continue };
        let len = o.block_size;
        let ret = c.io(false, b * len as u64, len);
        if ret != 0 {
            return Err(format!("read of block {b} failed: {ret}"));
        }
        let got = describe(&c.buf()[..len]);
        if got == Some((o.seed, b, p)) {
            ok += 1;
        } else if in_flight == Some((b, p + 1)) && got == Some((o.seed, b, p + 1)) {
            ok += 1;
            newer += 1;
        } else {
            bad += 1;
            if bad <= 10 {
                eprintln!("block {b}: acknowledged pass {p}, found {got:?}");
            }
        }
    }
    println!(
        "acknowledged writes {}, blocks checked {}, intact {ok} ({newer} with the in-flight write), lost {bad}",
        order.len(),
        last.len()
    );
    Ok(bad == 0 && !last.is_empty())
}

fn superblock(f: &mut std::fs::File, path: &str) -> Result<vhost_user_md::md::Superblock, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut sb = vec![0u8; 4096];
    f.seek(SeekFrom::Start(4096)).map_err(|e| e.to_string())?;
    f.read_exact(&mut sb).map_err(|e| format!("{path}: {e}"))?;
    vhost_user_md::md::Superblock::decode(&sb).map_err(|e| format!("{path}: {e}"))
}

fn corrupt(args: &[String]) -> Result<bool, String> {
    use std::os::unix::fs::FileExt;
    let [path, mib] = args else {
        return Err("corrupt needs LEG MIB".into());
    };
    let mib: u64 = mib.parse().map_err(|e| format!("{mib}: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let sb = superblock(&mut f, path)?;
    if (mib + 1) << 20 > sb.size * 512 {
        return Err(format!("MiB {mib} is beyond the data area"));
    }
    let off = sb.data_offset * 512 + (mib << 20);
    f.write_all_at(&[0xa5; 64 * 1024], off)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{path}: {e}"))?;
    println!("{path}: 64 KiB at MiB {mib} of the data area overwritten");
    Ok(true)
}

fn data_area(path: &str) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let sb = superblock(&mut f, path)?;
    let mut data = vec![0u8; (sb.size * 512) as usize];
    f.seek(SeekFrom::Start(sb.data_offset * 512))
        .map_err(|e| e.to_string())?;
    f.read_exact(&mut data)
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(data)
}

fn compare(legs: &[String]) -> Result<bool, String> {
    if legs.len() < 2 {
        return Err("compare-legs needs two or more legs".into());
    }
    let first = data_area(&legs[0])?;
    let mut same = true;
    for l in &legs[1..] {
        let d = data_area(l)?;
        match first.iter().zip(&d).position(|(a, b)| a != b) {
            _ if d.len() != first.len() => {
                println!("{} and {l}: data areas differ in size", legs[0]);
                same = false;
            }
            Some(i) => {
                let differ = first
                    .chunks(4096)
                    .zip(d.chunks(4096))
                    .filter(|(a, b)| a != b)
                    .count();
                println!(
                    "{} and {l} differ: first at byte {i}, {differ} 4 KiB blocks differ",
                    legs[0]
                );
                same = false;
            }
            None => println!(
                "{} and {l}: data areas identical ({} bytes)",
                legs[0],
                d.len()
            ),
        }
    }
    Ok(same)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("write") => opts(&args[1..]).and_then(|o| write(&o).map(|()| true)),
        Some("verify") => opts(&args[1..]).and_then(|o| verify(&o)),
        Some("compare-legs") => compare(&args[1..]),
        Some("corrupt") => corrupt(&args[1..]),
        _ => Err("usage: guest_io write|verify TARGET --seed S --first F --blocks N [--block-size B] [--passes P] [--acks FILE] | compare-legs LEG LEG... | corrupt LEG MIB".into()),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("guest_io: {e}");
            ExitCode::from(2)
        }
    }
}
