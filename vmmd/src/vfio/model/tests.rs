//! Unit tests of the parent module.
use super::*;

fn fake_resolver() -> Arc<Resolver> {
    // Host address = file offset + 1 TiB * generation; generation is the top bits.
    Arc::new(|vaddr, _size| {
        Some(Backing {
            dev: (0, 1),
            inode: 7,
            offset: vaddr % (1 << 40),
        })
    })
}

fn model() -> (ModelKernel, ModelContainerHandle) {
    let k = ModelKernel::with_state(ModelState::default(), None, fake_resolver());
    let c = k.open_container();
    c.attach_group(5, None).unwrap();
    c.set_iommu().unwrap();
    (k, c)
}

#[test]
fn extensions_are_answered_only_after_set_iommu() {
    let k = ModelKernel::with_state(ModelState::default(), None, fake_resolver());
    let c = k.open_container();
    assert_eq!(c.check_extension(VFIO_UPDATE_VADDR), Ok(false));
    c.attach_group(1, None).unwrap();
    c.set_iommu().unwrap();
    assert_eq!(c.check_extension(VFIO_UPDATE_VADDR), Ok(true));
    k.set_vaddr_support(false);
    assert_eq!(c.check_extension(VFIO_UPDATE_VADDR), Ok(false));
    assert_eq!(c.check_extension(VFIO_UNMAP_ALL), Ok(false));
}

#[test]
fn map_rules() {
    let (_, c) = model();
    assert_eq!(c.map_dma(0, 0x1000, 0x1_0000), Ok(()));
    assert_eq!(c.map_dma(0, 0x1000, 0x2_0000), Err(Errno::EEXIST));
    assert_eq!(c.map_dma(0x1800, 0x1000, 0x2_0000), Err(Errno::EINVAL));
    assert_eq!(c.unmap_dma(0, 0x2000), Ok(0x1000));
}

#[test]
fn invalidate_twice_fails_and_undoes_that_call() {
    let (k, c) = model();
    c.map_dma(0, 0x1000, 0x1_0000).unwrap();
    c.map_dma(0x1000, 0x1000, 0x1_1000).unwrap();
    c.invalidate_vaddr(0x1000, 0x1000).unwrap();
    // The ALL call invalidates iova 0 first, then meets the already-invalid one: undone.
    assert_eq!(c.invalidate_all_vaddr(), Err(Errno::EINVAL));
    let s = k.state();
    assert_eq!(s.containers[&0].dmas[0].vaddr, Some(0x1_0000));
    assert_eq!(s.containers[&0].dmas[1].vaddr, None);
}

#[test]
fn update_vaddr_rules_and_locked_memory_moves_to_the_new_mm() {
    let (k, c) = model();
    c.map_dma(0, 0x2000, 0x1_0000).unwrap();
    assert_eq!(
        c.update_vaddr(0, 0x2000, 0x5_0000),
        Err(Errno::EINVAL),
        "still valid"
    );
    c.invalidate_all_vaddr().unwrap();
    assert_eq!(
        c.attach_group(6, None),
        Err(Errno::EBUSY),
        "attach while invalid"
    );
    k.set_mm(42);
    assert_eq!(c.update_vaddr(0x1000, 0x1000, 0x5_1000), Err(Errno::ENOENT));
    assert_eq!(
        c.update_vaddr(0, 0x1000, 0x5_0000),
        Err(Errno::EINVAL),
        "size differs"
    );
    c.update_vaddr(0, 0x2000, (1 << 40) + 0x1_0000).unwrap();
    let s = k.state();
    assert_eq!(s.locked.get(&42), Some(&0x2000));
    assert_eq!(s.locked.len(), 1);
    assert!(s.violations.is_empty());
    c.invalidate_all_vaddr().unwrap();
    c.update_vaddr(0, 0x2000, 0x9_0000).unwrap();
    assert_eq!(
        k.state().violations.len(),
        1,
        "re-map at other memory is flagged"
    );
}

#[test]
fn faults_fire_on_the_nth_matching_call_only() {
    let (k, c) = model();
    k.inject("map-dma:0:1:EFAULT").unwrap();
    assert!(k.inject("nope").is_err());
    assert_eq!(c.map_dma(0, 0x1000, 0x1_0000), Ok(()));
    assert_eq!(c.map_dma(0x1000, 0x1000, 0x1_1000), Err(Errno::EFAULT));
    assert_eq!(c.map_dma(0x1000, 0x1000, 0x1_1000), Ok(()));
    assert!(k
        .state()
        .log
        .iter()
        .any(|l| l.contains("EFAULT (injected)")));
    assert!("bogus".parse::<Fault>().is_err());
    assert!("map-dma:x".parse::<Fault>().is_err());
}

#[test]
fn state_survives_in_its_file() {
    let dir = std::env::temp_dir().join(format!("vfio-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.json");
    let k = ModelKernel::open(&path).unwrap();
    let c = k.open_container();
    c.attach_group(3, None).unwrap();
    let again = ModelKernel::read_state(&path).unwrap();
    assert_eq!(again.containers[&0].groups, vec![3]);
    std::fs::write(&path, b"{").unwrap();
    assert!(matches!(
        ModelKernel::open(&path),
        Err(ModelError::Corrupt { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}
