//! Running one workflow for many VMs (`--all`): the vmmd sockets of a directory, at most `jobs`
//! at a time, optionally starting no new one after the first failure.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The vmmd API sockets `<dir>/<name>.sock`, sorted by name.
pub fn discover(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let path = e.path();
        let is_sock = path.extension().is_some_and(|x| x == "sock");
        let is_socket = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
        if is_sock && is_socket {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// How one target of [`run_parallel`] went, as far as the runner needs to know.
pub trait FleetResult {
    /// Whether it failed (with `stop_on_failure`, no new target starts afterwards).
    fn failed(&self) -> bool;
}

/// What the runner reports for a target it did not run to the end.
pub enum NotRun {
    /// It was not started because an earlier target failed.
    NotStarted,
    /// Its task panicked or was cancelled.
    Lost,
}

/// Runs `f` for every target, at most `jobs` at a time, in the targets' order (each starts when a
/// slot is free). With `stop_on_failure`, a target whose turn comes after
/// one has failed is not started. The results come back in the targets' order; `not_run` makes the
/// result of a target that was not started or whose task was lost.
pub async fn run_parallel<T, R, F, Fut, N>(
    targets: Vec<T>,
    jobs: u16,
    stop_on_failure: bool,
    f: F,
    not_run: N,
) -> Vec<R>
where
    T: Clone + Send + 'static,
    R: FleetResult + Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
    N: Fn(&T, NotRun) -> R,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(usize::from(jobs.max(1))));
    let stop = Arc::new(AtomicBool::new(false));
    let mut out: Vec<Option<R>> = (0..targets.len()).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in targets.iter().cloned().enumerate() {
        // A slot frees when a running target ends, after it has said whether it failed.
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            break;
        };
        if stop_on_failure && stop.load(Ordering::SeqCst) {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(not_run(&t, NotRun::NotStarted));
            }
            continue;
        }
        let stop = Arc::clone(&stop);
        let fut = f(t);
        set.spawn(async move {
            let r = fut.await;
            if r.failed() {
                stop.store(true, Ordering::SeqCst);
            }
            drop(permit);
            (i, r)
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, result)) => {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(result);
                }
            }
            Err(e) => tracing::error!(error = %e, "a workflow task failed"),
        }
    }
    out.into_iter()
        .zip(&targets)
        .map(|(r, t)| r.unwrap_or_else(|| not_run(t, NotRun::Lost)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum R {
        Ok(u32),
        Failed(u32),
        NotStarted(u32),
        Lost(u32),
    }

    impl FleetResult for R {
        fn failed(&self) -> bool {
            matches!(self, R::Failed(_))
        }
    }

    async fn go(stop_on_failure: bool, jobs: u16) -> Vec<R> {
        run_parallel(
            vec![1, 2, 3, 4],
            jobs,
            stop_on_failure,
            |t: u32| async move {
                tokio::time::sleep(Duration::from_millis(u64::from(5 - t))).await;
                if t == 2 {
                    R::Failed(t)
                } else {
                    R::Ok(t)
                }
            },
            |t, why| match why {
                NotRun::NotStarted => R::NotStarted(*t),
                NotRun::Lost => R::Lost(*t),
            },
        )
        .await
    }

    #[tokio::test]
    async fn one_at_a_time_the_first_failure_stops_the_rest() {
        assert_eq!(
            go(true, 1).await,
            [R::Ok(1), R::Failed(2), R::NotStarted(3), R::NotStarted(4)]
        );
    }

    #[tokio::test]
    async fn keep_going_runs_every_target_in_order() {
        assert_eq!(
            go(false, 1).await,
            [R::Ok(1), R::Failed(2), R::Ok(3), R::Ok(4)]
        );
        assert_eq!(
            go(false, 4).await,
            [R::Ok(1), R::Failed(2), R::Ok(3), R::Ok(4)]
        );
    }

    #[tokio::test]
    async fn targets_already_running_finish_after_a_failure() {
        // With 4 slots everything starts before the failure is known.
        assert_eq!(
            go(true, 4).await,
            [R::Ok(1), R::Failed(2), R::Ok(3), R::Ok(4)]
        );
    }

    #[test]
    fn discover_lists_sockets_only_sorted() {
        let dir = std::env::temp_dir().join(format!("cprctl-discover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let _b = std::os::unix::net::UnixListener::bind(dir.join("b.sock")).expect("bind");
        let _a = std::os::unix::net::UnixListener::bind(dir.join("a.sock")).expect("bind");
        std::fs::write(dir.join("c.sock"), "").expect("write");
        let _d = std::os::unix::net::UnixListener::bind(dir.join("d.console")).expect("bind");
        let found = discover(&dir).expect("discover");
        assert_eq!(found, [dir.join("a.sock"), dir.join("b.sock")]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(discover(&dir).is_err());
    }
}
