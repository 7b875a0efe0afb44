//! A blocking gRPC client for tests: each call runs on the client's own tokio runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cprctl::client::{self, Client, ClientError};
use tonic::Status;
use vmmd_proto::v1::{
    Event, EventsRequest, GetMigrationParametersRequest, InfoRequest, InfoResponse,
    MigrateIncomingRequest, MigrateRequest, MigrationInfo, MigrationMode, MigrationParameters,
    PauseRequest, QueryMigrateRequest, QuitRequest, ResumeRequest, RunState, SystemWakeupRequest,
};

/// A connected vmmd API client.
pub struct Api {
    rt: tokio::runtime::Runtime,
    client: Client,
    socket: PathBuf,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("socket", &self.socket).finish()
    }
}

impl Api {
    /// Connects to the API socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime for the test client");
        let client = rt.block_on(client::connect(socket))?;
        Ok(Self {
            rt,
            client,
            socket: socket.to_path_buf(),
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Info.
    pub fn info(&self) -> Result<InfoResponse, Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.info(InfoRequest {}))
            .map(|r| r.into_inner())
    }

    /// The current runstate; panics if Info fails.
    pub fn run_state(&self) -> RunState {
        let info = self.info().expect("Info failed");
        RunState::try_from(info.run_state).expect("vmmd returned an unknown runstate")
    }

    /// Polls Info until the runstate is `want`; panics after `timeout` with the last state seen.
    pub fn wait_for_run_state(&self, want: RunState, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.run_state();
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "runstate is still {now:?} after {timeout:?}, expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pause; returns the new runstate.
    pub fn pause(&self) -> Result<RunState, Status> {
        let mut c = self.client.clone();
        let r = self.rt.block_on(c.pause(PauseRequest {}))?.into_inner();
        Ok(RunState::try_from(r.run_state).unwrap_or(RunState::Unspecified))
    }

    /// Resume; returns the new runstate.
    pub fn resume(&self) -> Result<RunState, Status> {
        let mut c = self.client.clone();
        let r = self.rt.block_on(c.resume(ResumeRequest {}))?.into_inner();
        Ok(RunState::try_from(r.run_state).unwrap_or(RunState::Unspecified))
    }

    /// SystemWakeup; returns the new runstate.
    pub fn wakeup(&self) -> Result<RunState, Status> {
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.system_wakeup(SystemWakeupRequest {}))?
            .into_inner();
        Ok(RunState::try_from(r.run_state).unwrap_or(RunState::Unspecified))
    }

    /// Quit.
    pub fn quit(&self) -> Result<(), Status> {
        let mut c = self.client.clone();
        self.rt.block_on(c.quit(QuitRequest {})).map(|_| ())
    }

    /// SetMigrationParameters with `mode`, keeping the exec arguments; returns the mode now in force.
    pub fn set_mode(&self, mode: MigrationMode) -> Result<MigrationMode, Status> {
        self.set_migration_parameters(mode, Vec::new())
            .map(|p| MigrationMode::try_from(p.mode).unwrap_or(MigrationMode::Unspecified))
    }

    /// SetMigrationParameters; `exec_args` empty keeps the current ones.
    pub fn set_migration_parameters(
        &self,
        mode: MigrationMode,
        exec_args: Vec<String>,
    ) -> Result<MigrationParameters, Status> {
        let mut c = self.client.clone();
        let params = MigrationParameters {
            mode: mode as i32,
            exec_args,
        };
        self.rt
            .block_on(c.set_migration_parameters(params))
            .map(|r| r.into_inner())
    }

    /// GetMigrationParameters.
    pub fn migration_parameters(&self) -> Result<MigrationParameters, Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.get_migration_parameters(GetMigrationParametersRequest {}))
            .map(|r| r.into_inner())
    }

    /// Migrate to `uri`.
    pub fn migrate(&self, uri: &str) -> Result<MigrationInfo, Status> {
        let mut c = self.client.clone();
        let req = MigrateRequest { uri: uri.into() };
        self.rt.block_on(c.migrate(req)).map(|r| r.into_inner())
    }

    /// MigrateIncoming from `uri`.
    pub fn migrate_incoming(&self, uri: &str) -> Result<MigrationInfo, Status> {
        let mut c = self.client.clone();
        let req = MigrateIncomingRequest { uri: uri.into() };
        self.rt
            .block_on(c.migrate_incoming(req))
            .map(|r| r.into_inner())
    }

    /// QueryMigrate.
    pub fn query_migrate(&self) -> Result<MigrationInfo, Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.query_migrate(QueryMigrateRequest {}))
            .map(|r| r.into_inner())
    }

    /// Subscribes to the event stream.
    pub fn events(&self) -> Result<Events<'_>, Status> {
        let mut c = self.client.clone();
        let stream = self.rt.block_on(c.events(EventsRequest {}))?.into_inner();
        Ok(Events { api: self, stream })
    }
}

/// A subscription to vmmd's events.
pub struct Events<'a> {
    api: &'a Api,
    stream: tonic::Streaming<Event>,
}

impl Events<'_> {
    /// The next event, `Ok(None)` when the stream ended or `timeout` passed.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Event>, Status> {
        let fut = tokio::time::timeout(timeout, self.stream.message());
        match self.api.rt.block_on(fut) {
            Ok(r) => r,
            Err(_elapsed) => Ok(None),
        }
    }
}
