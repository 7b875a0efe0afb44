//! Unit tests of the parent module.
use std::os::fd::FromRawFd;

use super::*;

/// A device whose "VFIO fd" is a memfd: config space at offset 0 (vendor 1234:11e8, a
/// capability list holding a 64-bit MSI capability at 0x40, INTx pin A) and a 1 MiB BAR 0
/// region at 0x10000. pread/pwrite on it behave as on a VFIO device fd's regions.
fn fake_device() -> PassthroughDevice {
    // SAFETY: memfd_create with a valid name; the fd is owned below.
    let raw = unsafe { libc::memfd_create(c"fake-vfio".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut config = [0u8; 256];
    config[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
    config[4..8].copy_from_slice(&(0x0010u32 << 16).to_le_bytes()); // status: capability list
    config[0x34] = 0x40;
    config[0x3d] = 1; // INTx pin A
    config[0x40..0x44].copy_from_slice(&0x0080_0005u32.to_le_bytes()); // MSI, 64-bit, last
    let file = std::fs::File::from(fd.try_clone().expect("dup"));
    file.set_len(0x11_0000).expect("size the fake regions");
    std::os::unix::fs::FileExt::write_all_at(&file, &config, 0).expect("write config");
    let mut dev = PassthroughDevice {
        name: "fake".into(),
        fd,
        config: Region {
            offset: 0,
            size: 256,
        },
        regions: vec![(
            0,
            Region {
                offset: 0x1_0000,
                size: 0x10_0000,
            },
        )],
        bars: Vec::new(),
        sizing: [false; 6],
        intx: None,
        gsi: 10,
        router: None,
        msi_cap: None,
        msi: None,
        msi_gsi: msi::IOAPIC_PINS,
    };
    dev.bars = dev.probe_bars();
    dev.msi_cap = dev.find_msi_cap();
    assign_bars(std::iter::once(&mut dev), 0xe000_0000, 0xfec0_0000).expect("BARs fit");
    dev
}

fn read32(dev: &PassthroughDevice, offset: u16) -> u32 {
    let mut d = [0u8; 4];
    dev.config_read(offset, &mut d);
    u32::from_le_bytes(d)
}

#[test]
fn the_guest_sees_vmmds_bars_interrupt_line_and_only_the_msi_capability() {
    let mut dev = fake_device();
    assert_eq!(read32(&dev, 0), 0x11e8_1234);
    assert_ne!(read32(&dev, 4) & PCI_STATUS_CAP_LIST, 0);
    assert_eq!(read32(&dev, 0x34) & 0xff, 0x40);
    assert_eq!(
        read32(&dev, 0x40),
        0x0080_0005,
        "MSI, next 0, 64-bit, not enabled"
    );
    assert_eq!(read32(&dev, 0x3c) & 0xff, 0xff, "no INTx eventfd: no line");
    assert_eq!(read32(&dev, 0x30), 0, "no ROM");

    // BAR sizing, then the address vmmd placed it at.
    assert_eq!(read32(&dev, 0x10), 0xe000_0000);
    dev.config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(read32(&dev, 0x10), 0xfff0_0000, "1 MiB");
    dev.config_write(0x10, &0xe000_0000u32.to_le_bytes());
    assert_eq!(read32(&dev, 0x10), 0xe000_0000);

    // BAR accesses go to the region.
    assert!(dev.mmio_write(0xe000_0008, &0xdead_beefu32.to_le_bytes()));
    let mut back = [0u8; 4];
    assert!(dev.mmio_read(0xe000_0008, &mut back));
    assert_eq!(u32::from_le_bytes(back), 0xdead_beef);
    assert!(!dev.mmio_read(0xe010_0000, &mut back), "past the BAR");

    // The guest programs MSI: a shadow (the device's own registers stay untouched).
    dev.config_write(0x44, &0xfee0_0000u32.to_le_bytes());
    dev.config_write(0x48, &0u32.to_le_bytes());
    dev.config_write(0x4c, &0x22u32.to_le_bytes());
    dev.config_write(0x40, &0x0001_0000u32.to_le_bytes());
    let saved = dev.save().expect("save");
    let cap = saved.msi.expect("MSI capability");
    assert!(cap.enabled());
    assert_eq!((cap.message.address, cap.message.data), (0xfee0_0000, 0x22));
    assert_eq!(read32(&dev, 0x40), 0x0081_0005);
    assert_eq!(
        dev.read_config_dword(0x44),
        0,
        "the device's MSI address is not written"
    );
    // A device opened afresh from the same fds gets the guest's programming back.
    let fresh = fake_device();
    let restored = PassthroughDevice::restore(fresh, &saved).expect("restore");
    assert_eq!(restored.save().expect("save"), saved);
    assert_eq!(read32(&restored, 0x40), 0x0081_0005);
}

#[test]
fn msi_off_hides_the_capability_list() {
    let mut dev = fake_device();
    dev.msi_cap = None;
    assert_eq!(read32(&dev, 4) & PCI_STATUS_CAP_LIST, 0);
    assert_eq!(read32(&dev, 0x34), 0);
    assert_eq!(read32(&dev, 0x40), 0);
}
