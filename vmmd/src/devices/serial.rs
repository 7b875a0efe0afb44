//! COM1: a 16550 UART (vm-superio) whose interrupt is an irqfd on GSI 4 and whose output goes to the
//! console backend.

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleWriter;
use crate::persist::Persist;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Last port of COM1.
pub const COM1_LAST: u16 = COM1_BASE + 7;
/// COM1's legacy interrupt line.
pub const COM1_GSI: u32 = 4;

/// Why the UART could not be rebuilt from saved state.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO is larger than a 16550's.
    #[error("saved UART state is invalid: {0:?}")]
    BadState(vm_superio::serial::Error<std::io::Error>),
    /// The interrupt eventfd could not be duplicated.
    #[error("cannot duplicate the UART interrupt eventfd")]
    Eventfd(#[source] std::io::Error),
}

/// Raises the UART's interrupt through an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Saved UART registers and receive FIFO.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What a UART is rebuilt with besides its registers.
pub struct SerialArgs {
    /// The interrupt eventfd (a KVM irqfd on [`COM1_GSI`]).
    pub irq: EventFd,
    /// Where the guest's output goes.
    pub out: ConsoleWriter,
}

impl Persist for SerialDevice {
    type State = UartState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> Result<UartState, SerialError> {
        Ok(self.uart.state().into())
    }

    fn restore(args: SerialArgs, state: &UartState) -> Result<SerialDevice, SerialError> {
        let uart = Serial::from_state(&state.into(), IrqTrigger(args.irq), NoEvents, args.out)
            .map_err(SerialError::BadState)?;
        Ok(SerialDevice { uart })
    }
}

/// COM1 as the vCPUs see it.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART in its reset state.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The interrupt eventfd's number.
    pub fn irq_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.uart.interrupt_evt().0)
    }

    /// This device's interrupt and output, to rebuild it from a saved state.
    pub fn constructor_args(&self) -> Result<SerialArgs, SerialError> {
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(SerialError::Eventfd)?;
        Ok(SerialArgs {
            irq,
            out: self.uart.writer().clone(),
        })
    }

    /// Register write from the guest.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!(error = ?e, "COM1 write: output or interrupt failed");
        }
    }

    /// Register read from the guest.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Bytes typed on the console; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}
