//! The device's own clock over a run of steps, for `shardline bench`. With
//! [`time_steps`] on, a step records a timing event on its stream before
//! its inputs' copy and another after its sampled ids' copy. When the ids
//! are collected, the GPU's timestamps give the step's busy time and the gap
//! since the previous step ended: time the device sat with nothing queued,
//! which is what overlapping the host's work with the device's should remove.
//! Off (the default), a step records nothing extra.

use super::{driver_error, CAPTURING};
use crate::backend::Result;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Bumped by each [`time_steps`]: a backend's first step after it measures
/// no gap from a step before it.
static EPOCH: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);
static BUSY_NS: AtomicU64 = AtomicU64::new(0);
static IDLE_NS: AtomicU64 = AtomicU64::new(0);
static GAPS: AtomicU64 = AtomicU64::new(0);

/// Turns step timing on or off for every CUDA backend of this process,
/// starting a new run: no gap is measured back to a step before this call.
pub fn time_steps(on: bool) {
    EPOCH.fetch_add(1, Ordering::Relaxed);
    ENABLED.store(on, Ordering::Relaxed);
}

/// The timed steps of this process so far, by the GPUs' clocks; the
/// difference over a run gives that run's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceTime {
    /// Steps timed from their inputs' copy to their ids' copy.
    pub steps: u64,
    pub busy: Duration,
    /// Gaps measured: between a step's end and the next step's start on
    /// the same stream (the first step of a chain has none).
    pub gaps: u64,
    pub idle: Duration,
}

impl DeviceTime {
    pub fn since(self, earlier: DeviceTime) -> DeviceTime {
        DeviceTime {
            steps: self.steps - earlier.steps,
            busy: self.busy - earlier.busy,
            gaps: self.gaps - earlier.gaps,
            idle: self.idle - earlier.idle,
        }
    }

    /// The share of the device's time spent idle between steps.
    pub fn idle_fraction(&self) -> f64 {
        let total = self.busy + self.idle;
        match total.is_zero() {
            true => 0.0,
            false => self.idle.as_secs_f64() / total.as_secs_f64(),
        }
    }
}

pub fn device_time() -> DeviceTime {
    let ns = |v: &AtomicU64| Duration::from_nanos(v.load(Ordering::Relaxed));
    DeviceTime {
        steps: STEPS.load(Ordering::Relaxed),
        busy: ns(&BUSY_NS),
        gaps: GAPS.load(Ordering::Relaxed),
        idle: ns(&IDLE_NS),
    }
}

/// Where a step's work began and ended on its stream.
pub struct StepSpan {
    start: CudaEvent,
    end: CudaEvent,
}

/// One backend's step timing.
#[derive(Default)]
pub(super) struct Timeline {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The start of the step being queued, until its ids' copy is.
    open: Option<CudaEvent>,
    /// The end of the last step collected.
    last_end: Option<CudaEvent>,
    /// The run (`EPOCH`) of the steps above.
    epoch: u64,
    spare: Vec<CudaEvent>,
}

impl State {
    fn record(&mut self, stream: &CudaStream) -> Result<CudaEvent> {
        let event = match self.spare.pop() {
            Some(event) => event,
            None => stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver_error("creating a timing event"))?,
        };
        event.record(stream).map_err(driver_error("recording a timing event"))?;
        Ok(event)
    }

    /// Forgets the previous step's end, so no gap is measured from it.
    fn break_chain(&mut self) {
        self.spare.extend(self.open.take());
        self.spare.extend(self.last_end.take());
    }
}

impl Timeline {
    fn on() -> bool {
        ENABLED.load(Ordering::Relaxed) && !CAPTURING.get()
    }

    /// Marks where a step's work begins on `stream`. After a step left
    /// open (its ids never fetched: a capture's, or a rank that does not
    /// sample), which ran unmeasured in between, or in a new run, the gap
    /// back to the last step is not measured.
    pub fn begin(&self, stream: &CudaStream) -> Result<()> {
        if !Self::on() {
            return Ok(());
        }
        let mut state = self.state.lock().expect("the timeline is not poisoned");
        let epoch = EPOCH.load(Ordering::Relaxed);
        if state.open.is_some() || state.epoch != epoch {
            state.break_chain();
            state.epoch = epoch;
        }
        let start = state.record(stream)?;
        state.open = Some(start);
        Ok(())
    }

    /// Marks where the open step's work ends (after its ids' copy).
    pub fn end(&self, stream: &CudaStream) -> Result<Option<StepSpan>> {
        if !Self::on() {
            return Ok(None);
        }
        let mut state = self.state.lock().expect("the timeline is not poisoned");
        let Some(start) = state.open.take() else {
            return Ok(None);
        };
        let end = state.record(stream)?;
        Ok(Some(StepSpan { start, end }))
    }

    /// Reads a step's span off the GPU once its ids are in.
    pub fn collect(&self, span: StepSpan) -> Result<()> {
        let ms = |a: &CudaEvent, b: &CudaEvent| -> Result<Duration> {
            let ms = a.elapsed_ms(b).map_err(driver_error("reading a timing event"))?;
            Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
        };
        let busy = ms(&span.start, &span.end)?;
        let mut state = self.state.lock().expect("the timeline is not poisoned");
        if let Some(previous) = state.last_end.take() {
            let idle = ms(&previous, &span.start)?;
            IDLE_NS.fetch_add(idle.as_nanos() as u64, Ordering::Relaxed);
            GAPS.fetch_add(1, Ordering::Relaxed);
            state.spare.push(previous);
        }
        BUSY_NS.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        STEPS.fetch_add(1, Ordering::Relaxed);
        state.spare.push(span.start);
        state.last_end = Some(span.end);
        Ok(())
    }
}
