//! The console's saved state (the guest's bytes it had not delivered) and the stopped console
//! that saves and restores it through [`Persist`].

use std::sync::Arc;

use crate::persist::Persist;

use super::{ConsoleError, ConsoleHandover, Shared};

/// What the guest can observe of a stopped console: bytes in flight between it and the client.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Guest output not yet delivered to the client, oldest first.
    pub output: Vec<u8>,
    /// Input read from the client that the UART has not taken yet, oldest first.
    pub input: Vec<u8>,
}

/// What restoring a console needs besides its state.
#[derive(Debug)]
pub struct ConsoleArgs {
    /// The backend's fds (inherited across `execve`, or those of a console stopped here).
    pub handover: ConsoleHandover,
    /// Size of the guest-output buffer.
    pub buffer_bytes: usize,
}

/// A console whose thread has stopped ([`super::Console::quiesce`], or [`Persist::restore`]):
/// its fds plus its state, ready to start again with [`super::Console::resume`].
#[derive(Debug)]
pub struct StoppedConsole {
    pub(super) handover: ConsoleHandover,
    pub(super) state: ConsoleState,
    pub(super) buffer_bytes: usize,
    /// The stopped console's shared state, when it restarts in the same process: the UART's
    /// writer and the input sink point at it.
    pub(super) shared: Option<Arc<Shared>>,
}

impl StoppedConsole {
    /// The fds and process facts to carry across `execve`.
    pub fn handover(&self) -> &ConsoleHandover {
        &self.handover
    }

    /// Gives up the state and the link to this process's UART, keeping the fds.
    pub fn into_handover(self) -> ConsoleHandover {
        self.handover
    }
}

impl Persist for StoppedConsole {
    type State = ConsoleState;
    type ConstructorArgs = ConsoleArgs;
    type Error = ConsoleError;

    fn save(&self) -> Result<ConsoleState, ConsoleError> {
        Ok(self.state.clone())
    }

    fn restore(args: ConsoleArgs, state: &ConsoleState) -> Result<StoppedConsole, ConsoleError> {
        if args.buffer_bytes == 0 {
            return Err(ConsoleError::ZeroBuffer);
        }
        Ok(StoppedConsole {
            handover: args.handover,
            state: state.clone(),
            buffer_bytes: args.buffer_bytes,
            shared: None,
        })
    }
}
