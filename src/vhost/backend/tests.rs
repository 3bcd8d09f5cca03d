use super::*;
use crate::raid1::metadata::{create_array, NewArray};
use crate::storage::{Leg, MemLeg};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
/// The data buffer lies in a second region, added later (ADD_MEM_REG).
const DATA: u64 = 0x10_0000;

fn device() -> BlockBackend {
    let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 8 << 20));
    let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 8 << 20));
    create_array(
        &[&*a, &*b],
        &NewArray {
            name: "t".into(),
            cluster_name: None,
            nodes: 1,
            bitmap_chunk: Some(1 << 20),
            assume_clean: true,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    let (array, _) = Array::assemble(vec![a, b]).unwrap();
    BlockBackend::new(
        Arc::new(array),
        BlockConfig {
            queues: 1,
            read_only: false,
            block_size: 512,
        },
    )
    .unwrap()
}

/// A pass of the worker took its memory table, the front-end then added a region
/// (ADD_MEM_REG, answered once the device had the new table) and made a request
/// whose buffer lies in it available: the pass takes that request too, and must
/// parse it against the new table (libblkio's first request after mapping its
/// buffer was now and then answered IOERR, "invalid guest address").
#[test]
fn a_request_taken_after_a_new_memory_region_is_parsed_with_it() {
    let dev = device();
    let ring = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    dev.update_memory(GuestMemoryAtomic::new(ring.clone()))
        .unwrap();
    let vring = Vring::new(GuestMemoryAtomic::new(ring.clone()), QUEUE_SIZE as u16).unwrap();
    // The worker's pass starts with the table it has now.
    let stale = dev.current_memory().unwrap();

    let data = GuestRegionMmap::from_range(GuestAddress(DATA), 0x1_0000, None).unwrap();
    let both = ring.insert_region(Arc::new(data)).unwrap();
    dev.update_memory(GuestMemoryAtomic::new(both.clone()))
        .unwrap();

    let q = MockSplitQueue::new(&both, 16);
    vring
        .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
        .unwrap();
    vring.set_queue_size(16);
    vring.set_queue_ready(true);
    dev.take_writer_role(0);

    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    both.write_slice(&h, GuestAddress(HDR)).unwrap();
    both.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    both.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let chain = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(DATA, 4096, next, 2),
        Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ]
    .map(RawDescriptor::from);
    q.add_desc_chains(&chain, 0).unwrap();

    dev.process_queue(0, &vring, stale).unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        let s: u8 = both.read_obj(GuestAddress(STATUS)).unwrap();
        if s != 0xee || start.elapsed() > std::time::Duration::from_secs(5) {
            break s;
        }
        dev.handle_completions(0, &vring).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert_eq!(status, VIRTIO_BLK_S_OK as u8, "the write was not done");
    let mut back = vec![0u8; 4096];
    dev.array
        .read(0, &mut [std::io::IoSliceMut::new(&mut back)])
        .unwrap();
    assert!(
        back.iter().all(|&b| b == 0x5a),
        "the write did not reach the array"
    );
}
