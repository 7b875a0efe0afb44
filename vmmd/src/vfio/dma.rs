//! Guest RAM mapped for DMA in every VFIO container, and the VADDR hand-over around `execve`.
//!
//! All guest RAM is mapped at iova = guest physical address in each container. Before a cpr-exec
//! the host addresses are invalidated container by container ([`DmaSpace::invalidate`]); the IOMMU
//! keeps translating, so devices go on DMA-ing into guest RAM. The new process gives every mapping
//! the new address of the same memfd offset ([`DmaSpace::revalidate`]). Either step undoes itself
//! when a call fails, so the mappings are always all valid or all invalid.

use nix::errno::Errno;
use tracing::{debug, warn};

use super::ioctls::{ContainerIoctls, ContainerOp};

/// One DMA mapping: guest RAM `[iova, iova+size)` at host address `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapping {
    /// IO virtual address (= guest physical address).
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host address in this process.
    pub vaddr: u64,
}

/// A VFIO call on the update path that failed, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VFIO container {container}: {} failed with {errno}{}", op.ioctl(), at.map(|iova| format!(" for iova {iova:#x}")).unwrap_or_default())]
pub struct DmaCallError {
    /// Index of the container (in the order of `--device` options).
    pub container: usize,
    /// The ioctl.
    pub op: ContainerOp,
    /// The mapping concerned, if the call named one.
    pub at: Option<u64>,
    /// The kernel's answer.
    pub errno: Errno,
}

/// The outcome of a failed update step: the failure, and whether undoing it worked.
#[derive(Debug, thiserror::Error)]
#[error("{failed}; {}", self.undo_text())]
pub struct DmaStepError {
    /// The call that failed.
    pub failed: DmaCallError,
    /// `None` when every compensating call worked; the first that failed otherwise.
    pub undo: Option<DmaCallError>,
}

impl DmaStepError {
    /// What undoing the step did.
    pub fn undo_text(&self) -> String {
        match &self.undo {
            None => "the mappings that had changed were restored".to_string(),
            Some(e) => format!("restoring the mappings also failed: {e}"),
        }
    }
}

/// One container and the mappings it holds.
pub struct ContainerMappings {
    ops: Box<dyn ContainerIoctls>,
    mappings: Vec<DmaMapping>,
}

/// Guest RAM as every container maps it.
pub struct DmaSpace {
    containers: Vec<ContainerMappings>,
    invalid: bool,
}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace")
            .field("containers", &self.containers.len())
            .field("invalid", &self.invalid)
            .finish()
    }
}

fn call_err(
    container: usize,
    op: ContainerOp,
    at: Option<u64>,
) -> impl FnOnce(Errno) -> DmaCallError {
    move |errno| DmaCallError {
        container,
        op,
        at,
        errno,
    }
}

impl DmaSpace {
    /// A space over `containers` (attached and with their IOMMU set), nothing mapped yet.
    pub fn new(containers: Vec<Box<dyn ContainerIoctls>>) -> DmaSpace {
        DmaSpace {
            containers: containers
                .into_iter()
                .map(|ops| ContainerMappings {
                    ops,
                    mappings: Vec::new(),
                })
                .collect(),
            invalid: false,
        }
    }

    /// Adopts containers inherited across `execve`: `regions` are mapped already, with their host
    /// addresses invalidated by the previous process.
    pub fn inherited(
        containers: Vec<Box<dyn ContainerIoctls>>,
        regions: &[DmaMapping],
    ) -> DmaSpace {
        DmaSpace {
            containers: containers
                .into_iter()
                .map(|ops| ContainerMappings {
                    ops,
                    mappings: regions.to_vec(),
                })
                .collect(),
            invalid: true,
        }
    }

    /// The containers' ioctls, in order.
    pub fn containers(&self) -> impl Iterator<Item = &dyn ContainerIoctls> {
        self.containers.iter().map(|c| &*c.ops)
    }

    /// Number of containers.
    pub fn len(&self) -> usize {
        self.containers.len()
    }

    /// Whether there is no container.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// Whether the host addresses are invalidated (between [`Self::invalidate`] and
    /// [`Self::revalidate`]).
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }

    /// The mappings of container `index`.
    pub fn mappings(&self, index: usize) -> &[DmaMapping] {
        self.containers.get(index).map_or(&[], |c| &c.mappings)
    }

    /// Maps `regions` into every container; on failure unmaps what this call mapped.
    pub fn map_all(&mut self, regions: &[DmaMapping]) -> Result<(), DmaStepError> {
        for k in 0..self.containers.len() {
            for (i, r) in regions.iter().enumerate() {
                let mapped = self.containers[k].ops.map_dma(r.iova, r.size, r.vaddr);
                if let Err(errno) = mapped {
                    let failed = call_err(k, ContainerOp::MapDma, Some(r.iova))(errno);
                    let undo = self.unmap_first(k, regions, i);
                    return Err(DmaStepError { failed, undo });
                }
                self.containers[k].mappings.push(*r);
            }
        }
        Ok(())
    }

    /// Unmaps everything of containers `0..k` and the first `i` regions of container `k`.
    fn unmap_first(&mut self, k: usize, regions: &[DmaMapping], i: usize) -> Option<DmaCallError> {
        let mut first_error = None;
        for (j, c) in self.containers.iter_mut().enumerate().take(k + 1) {
            let count = if j == k { i } else { regions.len() };
            for r in &regions[..count] {
                if let Err(e) = c.ops.unmap_dma(r.iova, r.size).map_err(call_err(
                    j,
                    ContainerOp::UnmapDma,
                    Some(r.iova),
                )) {
                    first_error.get_or_insert(e);
                }
            }
            c.mappings.clear();
        }
        first_error
    }

    /// Invalidates the host address of every mapping, container by container (`VFIO_IOMMU_UNMAP_DMA`
    /// with `VADDR | ALL`). When container `k` fails, containers `0..k` get their addresses back.
    ///
    /// `repeat_last` (a test hook for real kernels) issues the last container's call twice, as a
    /// stray duplicate would: the kernel refuses the second, and all containers are restored.
    pub fn invalidate(&mut self, repeat_last: bool) -> Result<(), DmaStepError> {
        let n = self.containers.len();
        for k in 0..n {
            let ops = &self.containers[k].ops;
            let repeated = match ops.invalidate_all_vaddr() {
                Ok(()) if repeat_last && k + 1 == n => {
                    ops.invalidate_all_vaddr().map_err(|e| (e, k + 1))
                }
                r => r.map_err(|e| (e, k)),
            };
            if let Err((errno, restore)) = repeated {
                let failed = call_err(k, ContainerOp::InvalidateVaddr, None)(errno);
                warn!(%failed, "VADDR invalidation failed; restoring the containers before it");
                let undo = self.restore_addresses(restore);
                return Err(DmaStepError { failed, undo });
            }
            debug!(container = k, "VFIO host addresses invalidated");
        }
        self.invalid = true;
        Ok(())
    }

    /// Gives the mappings of containers `0..k` their current host addresses back.
    fn restore_addresses(&mut self, k: usize) -> Option<DmaCallError> {
        let mut first_error = None;
        for (j, c) in self.containers.iter().enumerate().take(k) {
            for m in &c.mappings {
                let r = c.ops.update_vaddr(m.iova, m.size, m.vaddr);
                if let Err(e) = r.map_err(call_err(j, ContainerOp::UpdateVaddr, Some(m.iova))) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error
    }

    /// Undoes [`Self::invalidate`] in the process that made it (a save or `execve` failed after it).
    pub fn cancel_invalidation(&mut self) -> Result<(), DmaCallError> {
        if !self.invalid {
            return Ok(());
        }
        match self.restore_addresses(self.containers.len()) {
            None => {
                self.invalid = false;
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Gives every invalidated mapping its address in this process: `vaddr_of(iova)` (same iova
    /// and size, `VFIO_DMA_MAP_FLAG_VADDR`). On failure the mappings re-validated by this call
    /// are invalidated again, one by one, so that the process rolled back to finds them all
    /// invalid, as this one did.
    pub fn revalidate(
        &mut self,
        vaddr_of: impl Fn(u64) -> Option<u64>,
    ) -> Result<(), DmaStepError> {
        let mut done: Vec<(usize, DmaMapping)> = Vec::new();
        let mut failure = None;
        'all: for (k, c) in self.containers.iter().enumerate() {
            for m in &c.mappings {
                let Some(vaddr) = vaddr_of(m.iova) else {
                    failure = Some(call_err(k, ContainerOp::UpdateVaddr, Some(m.iova))(
                        Errno::EFAULT,
                    ));
                    break 'all;
                };
                if let Err(errno) = c.ops.update_vaddr(m.iova, m.size, vaddr) {
                    failure = Some(call_err(k, ContainerOp::UpdateVaddr, Some(m.iova))(errno));
                    break 'all;
                }
                done.push((k, DmaMapping { vaddr, ..*m }));
            }
        }
        if let Some(failed) = failure {
            warn!(%failed, "VADDR update failed; invalidating the mappings updated before it");
            let mut undo = None;
            for (k, m) in done {
                let r = self.containers[k].ops.invalidate_vaddr(m.iova, m.size);
                if let Err(e) = r.map_err(call_err(k, ContainerOp::InvalidateVaddr, Some(m.iova))) {
                    undo.get_or_insert(e);
                }
            }
            return Err(DmaStepError { failed, undo });
        }
        for (k, m) in done {
            if let Some(slot) = self.containers[k]
                .mappings
                .iter_mut()
                .find(|x| x.iova == m.iova)
            {
                *slot = m;
            }
        }
        self.invalid = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::model::{Backing, ModelKernel, ModelState};
    use super::*;

    /// Two "processes" map the same file: generation g sees file offset o at `g << 40 | o`.
    fn resolver() -> Arc<super::super::model::Resolver> {
        Arc::new(|vaddr, _| {
            Some(Backing {
                dev: (0, 1),
                inode: 9,
                offset: vaddr & ((1 << 40) - 1),
            })
        })
    }

    const REGIONS: [(u64, u64); 2] = [(0, 0x10_0000), (0x1_0000_0000, 0x4_0000)];

    fn regions(generation: u64) -> Vec<DmaMapping> {
        // Host offset = iova (a memfd laid out like guest RAM), shifted per generation.
        REGIONS
            .iter()
            .map(|&(iova, size)| DmaMapping {
                iova,
                size,
                vaddr: generation << 40 | iova,
            })
            .collect()
    }

    fn space(kernel: &ModelKernel, containers: usize) -> DmaSpace {
        let handles: Vec<Box<dyn ContainerIoctls>> = (0..containers)
            .map(|g| {
                let c = kernel.open_container();
                c.attach_group(g as u32 + 10, None).unwrap();
                c.set_iommu().unwrap();
                Box::new(c) as Box<dyn ContainerIoctls>
            })
            .collect();
        let mut space = DmaSpace::new(handles);
        space.map_all(&regions(1)).unwrap();
        space
    }

    fn adopt(kernel: &ModelKernel, containers: usize, generation: u64) -> DmaSpace {
        kernel.set_mm(generation);
        let handles = (0..containers)
            .map(|id| {
                Box::new(kernel.adopt_container(id as u32).unwrap()) as Box<dyn ContainerIoctls>
            })
            .collect();
        DmaSpace::inherited(handles, &regions(generation))
    }

    /// Every mapping is valid, at generation `g`'s address, and pins the same file offset.
    fn assert_all_valid_at(kernel: &ModelKernel, generation: u64) {
        let s = kernel.state();
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        for c in s.containers.values() {
            assert_eq!(c.dmas.len(), REGIONS.len());
            for d in &c.dmas {
                assert_eq!(d.vaddr, Some(generation << 40 | d.iova), "{d:?}");
                assert_eq!(d.backing.offset, d.iova);
            }
        }
    }

    fn model() -> ModelKernel {
        ModelKernel::with_state(ModelState::default(), None, resolver())
    }

    /// One update as vmmd does it: invalidate in the old process; exec; re-validate in the new
    /// one, and on failure there, re-validate in the previous binary (generation 3).
    fn update(kernel: &ModelKernel, old: &mut DmaSpace, containers: usize) -> Result<(), String> {
        old.invalidate(false)
            .map_err(|e| format!("invalidate: {e}"))?;
        let mut new = adopt(kernel, containers, 2);
        if let Err(e) = new.revalidate(|iova| Some(2 << 40 | iova)) {
            assert!(e.undo.is_none(), "{e}");
            let mut previous = adopt(kernel, containers, 3);
            previous
                .revalidate(|iova| Some(3 << 40 | iova))
                .expect("rollback re-validation");
            return Err(format!("revalidate: {e}"));
        }
        Ok(())
    }

    #[test]
    fn a_clean_update_moves_every_mapping_to_the_new_address() {
        for containers in 1..=3 {
            let kernel = model();
            let mut old = space(&kernel, containers);
            update(&kernel, &mut old, containers).unwrap();
            assert_all_valid_at(&kernel, 2);
            let s = kernel.state();
            assert_eq!(
                s.locked.get(&2),
                Some(&(containers as u64 * 0x14_0000)),
                "{:?}",
                s.locked
            );
        }
    }

    #[test]
    fn a_failure_at_every_call_of_the_update_path_leaves_every_mapping_valid() {
        for containers in 1..=3u32 {
            // Count the update path's calls per op and container with a clean run first.
            let calls = |op: ContainerOp, c: u32| match op {
                ContainerOp::InvalidateVaddr => 1,
                ContainerOp::UpdateVaddr => REGIONS.len() as u32,
                _ => 0,
            } * u32::from(c < containers);
            for op in [ContainerOp::InvalidateVaddr, ContainerOp::UpdateVaddr] {
                for c in 0..containers {
                    for nth in 0..calls(op, c) {
                        let kernel = model();
                        let mut old = space(&kernel, containers as usize);
                        kernel
                            .inject(&format!("{}:{c}:{nth}:EFAULT", op.name()))
                            .unwrap();
                        let err = update(&kernel, &mut old, containers as usize).unwrap_err();
                        assert!(
                            err.contains(&format!("container {c}")) && err.contains("EFAULT"),
                            "{err}"
                        );
                        if op == ContainerOp::InvalidateVaddr {
                            // Old process resumes with its own addresses.
                            assert_all_valid_at(&kernel, 1);
                        } else {
                            assert_all_valid_at(&kernel, 3);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_failed_save_after_invalidation_restores_the_old_addresses() {
        let kernel = model();
        let mut old = space(&kernel, 3);
        old.invalidate(false).unwrap();
        assert!(old.is_invalid());
        old.cancel_invalidation().unwrap();
        assert_all_valid_at(&kernel, 1);
        // A second update after the cancelled one works.
        update(&kernel, &mut old, 3).unwrap();
        assert_all_valid_at(&kernel, 2);
    }

    #[test]
    fn invalidating_twice_is_refused_by_the_kernel_and_rolled_back() {
        let kernel = model();
        let mut old = space(&kernel, 2);
        // Container 1 already invalid (a stray earlier call): the ALL call fails there.
        old.containers()
            .nth(1)
            .unwrap()
            .invalidate_all_vaddr()
            .unwrap();
        let err = old.invalidate(false).unwrap_err();
        assert_eq!(err.failed.container, 1);
        assert_eq!(err.failed.errno, Errno::EINVAL);
        assert!(err.undo.is_none());
        let s = kernel.state();
        assert!(s.containers[&0].dmas.iter().all(|d| d.vaddr.is_some()));
    }

    #[test]
    fn a_repeated_invalidation_is_refused_and_every_container_restored() {
        let kernel = model();
        let mut old = space(&kernel, 3);
        let err = old.invalidate(true).unwrap_err();
        assert_eq!((err.failed.container, err.failed.errno), (2, Errno::EINVAL));
        assert!(err.undo.is_none(), "{err}");
        assert_all_valid_at(&kernel, 1);
        update(&kernel, &mut old, 3).unwrap();
        assert_all_valid_at(&kernel, 2);
    }

    #[test]
    fn map_all_undoes_itself() {
        let kernel = model();
        kernel.inject("map-dma:1:1:ENOMEM").unwrap();
        let handles: Vec<Box<dyn ContainerIoctls>> = (0..2)
            .map(|g| {
                let c = kernel.open_container();
                c.attach_group(g, None).unwrap();
                c.set_iommu().unwrap();
                Box::new(c) as Box<dyn ContainerIoctls>
            })
            .collect();
        let mut space = DmaSpace::new(handles);
        let err = space.map_all(&regions(1)).unwrap_err();
        assert_eq!((err.failed.container, err.failed.errno), (1, Errno::ENOMEM));
        assert!(kernel
            .state()
            .containers
            .values()
            .all(|c| c.dmas.is_empty()));
        assert!(kernel.state().locked.is_empty());
    }
}
