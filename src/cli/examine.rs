//! `examine`: what `mdadm --examine` and `mdadm --examine-bitmap` show, for each leg,
//! plus whether several legs form one consistent array.

use crate::md::bitmap::state as bstate;
use crate::md::human::{ctime_utc, human_chunksize, human_size, percent};
use crate::md::superblock::{devflag, feature, role, time_seconds};
use crate::raid1::metadata::LegMetadata;
use crate::storage::{FileLeg, OpenMode};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;

/// One node slot's bitmap.
#[derive(Debug, Serialize)]
pub struct SlotReport {
    /// Slot number.
    pub slot: u32,
    /// Bitmap events.
    pub events: u64,
    /// Events when bits were last cleared.
    pub events_cleared: u64,
    /// Raw state bits.
    pub state: u32,
    /// "OK", "Out of date" or "Unknown".
    pub state_text: &'static str,
    /// Bits (chunks).
    pub chunks: u64,
    /// Dirty bits.
    pub dirty: u64,
}

/// The bitmap part.
#[derive(Debug, Serialize)]
pub struct BitmapReport {
    /// 4 or 5.
    pub version: u32,
    /// uuid in the bitmap superblock.
    pub uuid: String,
    /// Bytes per bit.
    pub chunksize: u32,
    /// Daemon period (s).
    pub daemon_sleep: u32,
    /// Write-behind limit.
    pub write_behind: u32,
    /// Sectors covered.
    pub sync_size: u64,
    /// Whether this is a clustered (per-node) bitmap.
    pub clustered: bool,
    /// Number of node slots (0 for a plain bitmap).
    pub nodes: u32,
    /// Cluster name (clustered only).
    pub cluster_name: Option<String>,
    /// Every slot.
    pub slots: Vec<SlotReport>,
}

/// The superblock part.
#[derive(Debug, Serialize)]
pub struct SuperblockReport {
    /// Metadata version.
    pub version: &'static str,
    /// `feature_map`.
    pub feature_map: u32,
    /// Array uuid (mdadm rendering).
    pub array_uuid: String,
    /// DLM lockspace name of the array (kernel `%pU`).
    pub lockspace: String,
    /// Array name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub creation_time: u64,
    /// RAID level.
    pub level: i32,
    /// Mirror slots.
    pub raid_devices: u32,
    /// Sectors of this leg usable for data.
    pub data_size: u64,
    /// Array size in sectors.
    pub size: u64,
    /// Sector where data starts.
    pub data_offset: u64,
    /// Sector of the superblock.
    pub super_offset: u64,
    /// Sectors from the superblock to the first bitmap.
    pub bitmap_offset: i32,
    /// Rebuilt sectors of this leg (when recovering).
    pub recovery_offset: Option<u64>,
    /// Array sectors known in sync (`u64::MAX` = clean).
    pub resync_offset: u64,
    /// "clean" or "active".
    pub state: &'static str,
    /// This leg's uuid.
    pub device_uuid: String,
    /// Last update, seconds since the epoch.
    pub update_time: u64,
    /// Stored checksum.
    pub checksum: u32,
    /// Update counter.
    pub events: u64,
    /// `WriteMostly1` (1) / `FailFast1` (2) bits.
    pub devflags: u8,
    /// Bad-block log size in sectors (0: none).
    pub bblog_size: u16,
    /// Bad-block log offset from the superblock (sectors).
    pub bblog_offset: i32,
    /// Index of this leg in the role table.
    pub dev_number: u32,
    /// This leg's role, as mdadm words it.
    pub device_role: String,
    /// One character per mirror slot.
    pub array_state: String,
}

/// Everything about one leg.
#[derive(Debug, Serialize)]
pub struct LegReport {
    /// The leg as named on the command line.
    pub leg: String,
    /// Why it could not be read, if so.
    pub error: Option<String>,
    /// Its superblock.
    pub superblock: Option<SuperblockReport>,
    /// Its bitmap(s).
    pub bitmap: Option<BitmapReport>,
}

/// Whether the legs form one array.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// True when every leg belongs to the same array and agrees with the others.
    pub consistent: bool,
    /// What disagrees.
    pub problems: Vec<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Per leg.
    pub legs: Vec<LegReport>,
    /// Present when more than one leg was examined.
    pub array: Option<Verdict>,
}

fn role_text(sb: &crate::md::Superblock) -> String {
    match sb.role() {
        r if r >= role::FAULTY => "spare".into(),
        role::JOURNAL => "Journal".into(),
        r if sb.feature_map & feature::REPLACEMENT != 0 => format!("Replacement device {r}"),
        r => format!("Active device {r}"),
    }
}

fn bitmap_state_text(state: u32) -> &'static str {
    match state {
        0 => "OK",
        bstate::STALE => "Out of date",
        _ => "Unknown",
    }
}

/// The report of one leg whose metadata was read.
pub fn report_leg(leg: &str, m: &LegMetadata) -> LegReport {
    let sb = &m.sb;
    let b = m.bitmap();
    let superblock = SuperblockReport {
        version: "1.2",
        feature_map: sb.feature_map,
        array_uuid: sb.set_uuid.mdadm(),
        lockspace: sb.set_uuid.lockspace_name(),
        name: sb.name(),
        creation_time: time_seconds(sb.ctime),
        level: sb.level,
        raid_devices: sb.raid_disks,
        data_size: sb.data_size,
        size: sb.size,
        data_offset: sb.data_offset,
        super_offset: sb.super_offset,
        bitmap_offset: sb.bitmap_offset,
        recovery_offset: (sb.feature_map & feature::RECOVERY_OFFSET != 0)
            .then_some(sb.recovery_offset),
        resync_offset: sb.resync_offset,
        state: if sb.is_clean() { "clean" } else { "active" },
        device_uuid: sb.device_uuid.mdadm(),
        update_time: time_seconds(sb.utime),
        checksum: sb.sb_csum,
        events: sb.events,
        devflags: sb.devflags,
        bblog_size: sb.bblog_size,
        bblog_offset: sb.bblog_offset,
        dev_number: sb.dev_number,
        device_role: role_text(sb),
        array_state: sb.array_state(),
    };
    let bitmap = BitmapReport {
        version: b.version,
        uuid: b.uuid.mdadm(),
        chunksize: b.chunksize,
        daemon_sleep: b.daemon_sleep,
        write_behind: b.write_behind,
        sync_size: b.sync_size,
        clustered: b.is_clustered(),
        nodes: if b.is_clustered() { b.nodes } else { 0 },
        cluster_name: b.is_clustered().then(|| b.cluster_name()),
        slots: m
            .bitmaps
            .iter()
            .map(|s| SlotReport {
                slot: s.slot,
                events: s.sb.events,
                events_cleared: s.sb.events_cleared,
                state: s.sb.state,
                state_text: bitmap_state_text(s.sb.state),
                chunks: s.bits.chunks(),
                dirty: s.bits.count_dirty(),
            })
            .collect(),
    };
    LegReport {
        leg: leg.to_string(),
        error: None,
        superblock: Some(superblock),
        bitmap: Some(bitmap),
    }
}

/// Compares legs that were examined together.
pub fn verdict(legs: &[(String, LegMetadata)]) -> Verdict {
    let mut problems = Vec::new();
    let Some((first_name, first)) = legs.first() else {
        return Verdict {
            consistent: false,
            problems: vec!["no leg could be read".into()],
        };
    };
    let max_events = legs.iter().map(|(_, m)| m.sb.events).max().unwrap_or(0);
    let mut seen_dev = std::collections::HashMap::new();
    for (name, m) in legs {
        let (a, b) = (&first.sb, &m.sb);
        if b.set_uuid != a.set_uuid {
            problems.push(format!(
                "{name}: array uuid {} differs from {first_name}'s {}",
                b.set_uuid, a.set_uuid
            ));
            continue;
        }
        if b.events < max_events {
            problems.push(format!(
                "{name}: events {} is behind {max_events} (stale leg)",
                b.events
            ));
        }
        for (field, x, y) in [
            (
                "raid_disks",
                u64::from(b.raid_disks),
                u64::from(a.raid_disks),
            ),
            ("size", b.size, a.size),
            ("level", b.level as u64, a.level as u64),
            (
                "bitmap chunksize",
                u64::from(m.bitmap().chunksize),
                u64::from(first.bitmap().chunksize),
            ),
            (
                "bitmap nodes",
                u64::from(m.bitmap().slots()),
                u64::from(first.bitmap().slots()),
            ),
        ] {
            if x != y {
                problems.push(format!(
                    "{name}: {field} {x} differs from {first_name}'s {y}"
                ));
            }
        }
        if b.events == a.events && b.dev_roles != a.dev_roles {
            problems.push(format!(
                "{name}: device roles differ from {first_name}'s at the same events"
            ));
        }
        if let Some(other) = seen_dev.insert(b.dev_number, name.clone()) {
            problems.push(format!(
                "{name}: dev_number {} is also used by {other} (the same leg twice?)",
                b.dev_number
            ));
        }
        if b.role() >= role::FAULTY {
            problems.push(format!("{name}: has no active role ({})", role_text(b)));
        }
    }
    Verdict {
        consistent: problems.is_empty(),
        problems,
    }
}

/// Runs `examine` and returns the report.
pub fn examine(paths: &[PathBuf]) -> Report {
    let mut legs = Vec::new();
    let mut loaded = Vec::new();
    for p in paths {
        let name = p.display().to_string();
        let leg = FileLeg::open(p, OpenMode::ReadOnly)
            .map_err(|e| format!("cannot open: {e}"))
            .and_then(|leg| LegMetadata::load(&leg).map_err(|e| e.to_string()));
        match leg {
            Ok(m) => {
                legs.push(report_leg(&name, &m));
                loaded.push((name, m));
            }
            Err(e) => legs.push(LegReport {
                leg: name,
                error: Some(e),
                superblock: None,
                bitmap: None,
            }),
        }
    }
    let array = (paths.len() > 1).then(|| {
        let mut v = verdict(&loaded);
        for l in &legs {
            if let Some(e) = &l.error {
                v.problems.insert(0, format!("{}: {e}", l.leg));
                v.consistent = false;
            }
        }
        v
    });
    Report { legs, array }
}

/// Renders one leg like `mdadm -E` followed by `mdadm -X`.
pub fn render_leg(r: &LegReport) -> String {
    let mut o = String::new();
    let (Some(s), Some(b)) = (&r.superblock, &r.bitmap) else {
        let _ = writeln!(
            o,
            "{}: {}",
            r.leg,
            r.error.as_deref().unwrap_or("unreadable")
        );
        return o;
    };
    let line = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{k:>15} : {v}");
    };
    let _ = writeln!(o, "{}:", r.leg);
    line(&mut o, "Magic", "a92b4efc".into());
    line(&mut o, "Version", s.version.into());
    line(&mut o, "Feature Map", format!("{:#x}", s.feature_map));
    line(&mut o, "Array UUID", s.array_uuid.clone());
    line(&mut o, "Name", s.name.clone());
    if let Some(c) = &b.cluster_name {
        line(&mut o, "Cluster Name", format!("{c:<64}"));
    }
    line(&mut o, "Creation Time", ctime_utc(s.creation_time));
    line(
        &mut o,
        "Raid Level",
        if s.level == 1 {
            "raid1".into()
        } else {
            format!("level {}", s.level)
        },
    );
    line(&mut o, "Raid Devices", s.raid_devices.to_string());
    o.push('\n');
    line(
        &mut o,
        "Avail Dev Size",
        format!("{} sectors{}", s.data_size, human_size(s.data_size << 9)),
    );
    if s.level == 1 {
        line(
            &mut o,
            "Array Size",
            format!("{} KiB{}", s.size / 2, human_size(s.size << 9)),
        );
        if s.size != s.data_size {
            line(
                &mut o,
                "Used Dev Size",
                format!("{} sectors{}", s.size, human_size(s.size << 9)),
            );
        }
    }
    line(&mut o, "Data Offset", format!("{} sectors", s.data_offset));
    line(
        &mut o,
        "Super Offset",
        format!("{} sectors", s.super_offset),
    );
    if let Some(r) = s.recovery_offset {
        line(&mut o, "Recovery Offset", format!("{r} sectors"));
    }
    line(&mut o, "State", s.state.into());
    line(&mut o, "Device UUID", s.device_uuid.clone());
    o.push('\n');
    line(
        &mut o,
        "Internal Bitmap",
        format!("{} sectors from superblock", s.bitmap_offset),
    );
    if s.devflags != 0 {
        let mut f = String::new();
        if s.devflags & devflag::WRITE_MOSTLY != 0 {
            f.push_str(" write-mostly");
        }
        if s.devflags & devflag::FAIL_FAST != 0 {
            f.push_str(" failfast");
        }
        let _ = writeln!(o, "          Flags :{f}");
    }
    line(&mut o, "Update Time", ctime_utc(s.update_time));
    if s.bblog_size != 0 && s.bblog_offset != 0 {
        let present = if s.feature_map & feature::BAD_BLOCKS != 0 {
            " - bad blocks present."
        } else {
            ""
        };
        line(
            &mut o,
            "Bad Block Log",
            format!(
                "{} entries available at offset {} sectors{present}",
                u32::from(s.bblog_size) * 512 / 8,
                s.bblog_offset
            ),
        );
    }
    line(&mut o, "Checksum", format!("{:x} - correct", s.checksum));
    line(&mut o, "Events", s.events.to_string());
    o.push('\n');
    let _ = writeln!(o, "   Device Role : {}", s.device_role);
    let _ = writeln!(
        o,
        "   Array State : {} ('A' == active, '.' == missing, 'R' == replacing)",
        s.array_state
    );
    o.push('\n');
    let wide = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{k:>16} : {v}");
    };
    wide(&mut o, "Filename", r.leg.clone());
    wide(&mut o, "Magic", "6d746962".into());
    wide(&mut o, "Version", b.version.to_string());
    wide(&mut o, "UUID", b.uuid.clone());
    let slot_lines = |o: &mut String, sl: &SlotReport| {
        wide(o, "Events", sl.events.to_string());
        wide(o, "Events Cleared", sl.events_cleared.to_string());
        wide(o, "State", sl.state_text.into());
    };
    let bits_line = |o: &mut String, sl: &SlotReport| {
        wide(
            o,
            "Bitmap",
            format!(
                "{} bits (chunks), {} dirty ({}%)",
                sl.chunks,
                sl.dirty,
                percent(sl.dirty, sl.chunks)
            ),
        );
    };
    if !b.clustered {
        if let Some(sl) = b.slots.first() {
            slot_lines(&mut o, sl);
        }
    }
    wide(&mut o, "Chunksize", human_chunksize(b.chunksize));
    wide(
        &mut o,
        "Daemon",
        format!("{}s flush period", b.daemon_sleep),
    );
    wide(
        &mut o,
        "Write Mode",
        if b.write_behind > 0 {
            format!("Allow write behind, max {}", b.write_behind)
        } else {
            "Normal".into()
        },
    );
    wide(
        &mut o,
        "Sync Size",
        format!("{}{}", b.sync_size / 2, human_size(b.sync_size * 512)),
    );
    if b.clustered {
        wide(&mut o, "Cluster nodes", b.nodes.to_string());
        wide(
            &mut o,
            "Cluster name",
            format!("{:<64}", b.cluster_name.clone().unwrap_or_default()),
        );
        for sl in &b.slots {
            wide(&mut o, "Node Slot", sl.slot.to_string());
            slot_lines(&mut o, sl);
            bits_line(&mut o, sl);
        }
    } else if let Some(sl) = b.slots.first() {
        bits_line(&mut o, sl);
    }
    o
}

/// Renders the whole report as text.
pub fn render(report: &Report) -> String {
    let mut o = String::new();
    for (i, l) in report.legs.iter().enumerate() {
        if i > 0 {
            o.push('\n');
        }
        o.push_str(&render_leg(l));
    }
    if let Some(v) = &report.array {
        o.push('\n');
        if v.consistent {
            let s = report.legs.first().and_then(|l| l.superblock.as_ref());
            let _ = writeln!(
                o,
                "Array: {} legs form one consistent array (uuid {}, events {})",
                report.legs.len(),
                s.map(|s| s.array_uuid.as_str()).unwrap_or("?"),
                s.map(|s| s.events).unwrap_or(0)
            );
        } else {
            let _ = writeln!(o, "Array: the legs do NOT form one consistent array:");
            for p in &v.problems {
                let _ = writeln!(o, "  - {p}");
            }
        }
    }
    o
}
