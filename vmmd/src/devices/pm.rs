//! The power-management device: ACPI PM1a event (status/enable) and control registers, through which
//! the guest powers off (S5) and suspends to RAM (S3) the way an OS does: by writing SLP_TYP and SLP_EN.
//!
//! Sleep types follow QEMU's DSDT (`\_S3` = 1, `\_S5` = 0) so the same guest code works on both. S3 is
//! modelled as "all vCPUs stop, RAM and CPU state are kept": on wakeup the guest continues right after
//! the instruction that entered S3, with WAK_STS set in PM1_STS.

use super::GuestRequest;
use crate::persist::Persist;

/// First port of the device (PM1a_EVT_BLK).
pub const PM_BASE: u16 = 0x600;
/// Last port of the device.
pub const PM_LAST: u16 = PM_BASE + 5;
/// Offset of PM1a_CNT_BLK from [`PM_BASE`].
pub const PM1_CNT_OFFSET: u16 = 4;

const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const SLP_TYP_S5: u16 = 0;
const SLP_TYP_S3: u16 = 1;
const SLP_TYP_S4: u16 = 2;
const WAK_STS: u16 = 1 << 15;

/// Saved registers of the PM device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmState {
    /// PM1_STS.
    pub status: u16,
    /// PM1_EN.
    pub enable: u16,
    /// PM1_CNT (without the write-only SLP_EN).
    pub control: u16,
}

impl Persist for PmDevice {
    type State = PmState;
    type ConstructorArgs = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<PmState, Self::Error> {
        Ok(self.state)
    }

    fn restore((): (), state: &PmState) -> Result<PmDevice, Self::Error> {
        Ok(PmDevice { state: *state })
    }
}

/// The PM1a register block.
#[derive(Debug, Default)]
pub struct PmDevice {
    state: PmState,
}

impl PmDevice {
    /// A device in its power-on state (SCI_EN set: the guest finds it in ACPI mode).
    pub fn new() -> PmDevice {
        PmDevice {
            state: PmState {
                control: 1,
                ..PmState::default()
            },
        }
    }

    /// Records that the system woke from S3.
    pub fn wake(&mut self) {
        self.state.status |= WAK_STS;
    }

    fn reg16(&mut self, offset: u16) -> Option<(&mut u16, u16)> {
        match offset {
            0 | 1 => Some((&mut self.state.status, 0)),
            2 | 3 => Some((&mut self.state.enable, 2)),
            4 | 5 => Some((&mut self.state.control, 4)),
            _ => None,
        }
    }

    /// Port read at `offset` (1 or 2 bytes).
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u16;
            if let Some((reg, base)) = self.reg16(off) {
                *b = (*reg >> (8 * (off - base))) as u8;
            }
        }
    }

    /// Port write at `offset`; returns what the guest asked for when it set SLP_EN.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<GuestRequest> {
        let mut request = None;
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u16;
            let Some((reg, base)) = self.reg16(off) else {
                continue;
            };
            let shift = 8 * (off - base);
            let value = u16::from(b) << shift;
            let mask = 0xffu16 << shift;
            match base {
                // PM1_STS: write 1 to clear.
                0 => *reg &= !value,
                _ => *reg = (*reg & !mask) | value,
            }
        }
        let cnt = self.state.control;
        if cnt & SLP_EN != 0 {
            self.state.control &= !SLP_EN;
            request = match (cnt >> SLP_TYP_SHIFT) & SLP_TYP_MASK {
                SLP_TYP_S3 => Some(GuestRequest::Suspend),
                SLP_TYP_S5 | SLP_TYP_S4 => Some(GuestRequest::PowerOff),
                other => Some(GuestRequest::Reset(format!(
                    "unsupported sleep type {other}"
                ))),
            };
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_requests() {
        let mut pm = PmDevice::new();
        let s3 = ((SLP_TYP_S3 << SLP_TYP_SHIFT) | SLP_EN | 1).to_le_bytes();
        assert_eq!(pm.write(PM1_CNT_OFFSET, &s3), Some(GuestRequest::Suspend));
        // SLP_EN is write-only.
        let mut r = [0u8; 2];
        pm.read(PM1_CNT_OFFSET, &mut r);
        assert_eq!(u16::from_le_bytes(r) & SLP_EN, 0);
        let s5 = (SLP_EN | 1).to_le_bytes();
        assert_eq!(pm.write(PM1_CNT_OFFSET, &s5), Some(GuestRequest::PowerOff));
        // Writing without SLP_EN asks for nothing.
        assert_eq!(pm.write(PM1_CNT_OFFSET, &1u16.to_le_bytes()), None);
    }

    #[test]
    fn wake_status_is_write_one_to_clear() {
        let mut pm = PmDevice::new();
        pm.wake();
        let mut r = [0u8; 2];
        pm.read(0, &mut r);
        assert_eq!(u16::from_le_bytes(r), WAK_STS);
        pm.write(0, &WAK_STS.to_le_bytes());
        pm.read(0, &mut r);
        assert_eq!(u16::from_le_bytes(r), 0);
        let saved = pm.save().expect("save");
        let restored = PmDevice::restore((), &saved).expect("restore");
        assert_eq!(restored.save().expect("save"), saved);
    }
}
