//! What a slot lock's value block holds: the owner's resync window and its lock
//! manager node id.

use crate::dlm::NodeId;

/// The resync window kept in a slot lock's LVB (`struct resync_info`, spec §3.4),
/// and after it the lock manager node id of the slot's owner (0: none), which
/// tells a node that joins later whose death frees the slot. (The kernel reads
/// the first 16 bytes only; its nodes never share a lockspace with ours.)
pub fn encode_window(lo: u64, hi: u64, owner: NodeId, lvb_len: usize) -> Vec<u8> {
    let mut v = vec![0u8; lvb_len.max(20)];
    v[..8].copy_from_slice(&lo.to_le_bytes());
    v[8..16].copy_from_slice(&hi.to_le_bytes());
    v[16..20].copy_from_slice(&owner.to_le_bytes());
    v
}

/// The slot owner's node id in a slot lock's LVB (0: not known).
pub fn decode_owner(lvb: &[u8]) -> NodeId {
    lvb.get(16..20)
        .and_then(|b| b.try_into().ok())
        .map_or(0, NodeId::from_le_bytes)
}

/// Reads a window from an LVB; an invalid or short LVB means no window.
pub fn decode_window(lvb: &[u8]) -> (u64, u64) {
    if lvb.len() < 16 {
        return (0, 0);
    }
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&lvb[..8]);
    hi.copy_from_slice(&lvb[8..16]);
    (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
}
