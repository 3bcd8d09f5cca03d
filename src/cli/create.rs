//! `create`: write md v1.2 superblocks and (per-node) bitmaps on two or more legs.

use super::size::parse_size;
use crate::md::human::{human_chunksize, human_size};
use crate::md::layout::DEFAULT_NODES;
use crate::md::Uuid;
use crate::raid1::metadata::{build_new_array, create_array, find_existing_md, NewArray};
use crate::storage::{Claim, FileLeg, Leg, OpenMode};
use clap::Args;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Flags of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Make a clustered array (md-cluster) for the corosync cluster of this name.
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// Number of node slots (per-node bitmaps) of a clustered array [default: 4].
    #[arg(long, value_name = "N", requires = "cluster_name")]
    pub nodes: Option<u32>,
    /// Create missing image files, and extend smaller ones, to this size (e.g. 10G).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Bytes covered by one bitmap bit (power of two, e.g. 64M; default as mdadm).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub bitmap_chunk: Option<u64>,
    /// Array name; stored as "hostname:NAME" unless it contains ':'.
    #[arg(long, value_name = "NAME", default_value = "vumd")]
    pub name: String,
    /// The legs are known to be identical (e.g. new zero-filled images): skip the initial resync.
    #[arg(long)]
    pub assume_clean: bool,
    /// Overwrite legs that already carry an md superblock.
    #[arg(long)]
    pub force: bool,
    /// Legs: block devices or image files.
    #[arg(required = true, num_args = 2.., value_name = "LEG")]
    pub legs: Vec<PathBuf>,
}

/// This host's name (for array names).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The stored array name: "homehost:name" when that fits in 31 bytes, as mdadm does.
pub fn stored_name(name: &str, host: &str) -> String {
    if name.contains(':') || host.is_empty() || host.len() + 1 + name.len() >= 32 {
        name.to_string()
    } else {
        format!("{host}:{name}")
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino() && x.rdev() == y.rdev(),
        _ => false,
    }
}

/// Runs `create`.
pub fn run(args: &CreateArgs) -> Result<(), String> {
    for (i, a) in args.legs.iter().enumerate() {
        for b in &args.legs[..i] {
            if a == b || same_file(a, b) {
                return Err(format!(
                    "{} and {} are the same leg; give distinct legs",
                    b.display(),
                    a.display()
                ));
            }
        }
    }
    // Check every existing leg, and the geometry, before creating or writing anything.
    let mut sizes = Vec::with_capacity(args.legs.len());
    for path in &args.legs {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match args.size {
                Some(s) => sizes.push(s),
                None => {
                    return Err(format!(
                        "{} does not exist; give --size to create image files",
                        path.display()
                    ))
                }
            },
            Err(e) => return Err(format!("{}: {e}", path.display())),
            Ok(meta) => {
                if meta.file_type().is_dir() {
                    return Err(format!("{} is a directory, not a leg", path.display()));
                }
                let leg = FileLeg::open_with(path, OpenMode::ReadOnly, false, Claim::Exclusive)
                    .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
                if args.size.is_some() && leg.is_block_device() {
                    return Err(format!(
                        "{} is a block device; --size only applies to image files",
                        path.display()
                    ));
                }
                let found = find_existing_md(&leg)
                    .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
                if let (Some(md), false) = (found, args.force) {
                    let uuid = md
                        .uuid
                        .map(|u| format!(", array uuid {u}"))
                        .unwrap_or_default();
                    return Err(format!(
                        "{} already carries an md superblock (metadata {}{uuid}); add --force to overwrite it",
                        path.display(),
                        md.version
                    ));
                }
                sizes.push(leg.size().max(args.size.unwrap_or(0)));
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let opts = NewArray {
        name: stored_name(&args.name, &hostname()),
        cluster_name: args.cluster_name.clone(),
        nodes: args.nodes.unwrap_or(DEFAULT_NODES),
        bitmap_chunk: args.bitmap_chunk,
        assume_clean: args.assume_clean,
        now,
        uuid: None,
    };
    let placeholder = vec![Uuid::default(); sizes.len()];
    build_new_array(&sizes, &opts, &placeholder, Uuid::default()).map_err(|e| e.to_string())?;
    let mode = match args.size {
        Some(s) => OpenMode::CreateSize(s),
        None => OpenMode::ReadWrite,
    };
    let legs = args
        .legs
        .iter()
        .map(|p| {
            FileLeg::open_with(p, mode, false, Claim::Exclusive)
                .map_err(|e| format!("{}: cannot open: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&dyn Leg> = legs.iter().map(|l| l as &dyn Leg).collect();
    let (g, metas) = create_array(&refs, &opts).map_err(|e| e.to_string())?;
    let uuid = metas[0].sb.set_uuid;
    let kind = match &args.cluster_name {
        Some(c) => format!("clustered RAID1 (cluster {c}, {} node slots)", g.slots),
        None => "RAID1".to_string(),
    };
    super::out(&format!(
        "created {kind} {uuid} on {} legs: {} sectors{}, data offset {} sectors, bitmap chunk {}{}\n",
        legs.len(),
        g.size,
        human_size(g.size * 512),
        g.data_offset,
        human_chunksize(g.bitmap.chunksize),
        if args.assume_clean {
            ""
        } else {
            "; the first assembly resyncs the whole array"
        }
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stored_name;

    #[test]
    fn names_like_mdadm() {
        assert_eq!(stored_name("0", "node1"), "node1:0");
        assert_eq!(stored_name("a:b", "node1"), "a:b");
        assert_eq!(stored_name("x", ""), "x");
        let long = "h".repeat(30);
        assert_eq!(stored_name("name", &long), "name");
    }
}
