//! glibc malloc settings the agent applies to itself at startup.
//!
//! Why: with 10k series, a third of the agent's peak memory was allocator overhead, not data
//! (`docs/agent.md`, "Memory"). Two settings measured to pay without a CPU cost
//! (`docs/benchmarks.md`, "Session 5: memory" and "Session 6: memory"):
//!
//! - at most two malloc arenas, instead of one per runtime thread;
//! - a fixed mmap threshold of 128 KiB, so sled's 512 KiB write buffers and large batch
//!   buffers get their own mapping, returned to the system when freed. Left alone, glibc
//!   raises the threshold after the first such free and keeps those buffers in an arena.
//!
//! The systemd unit used to carry these as `MALLOC_*` environment variables. Applied here,
//! they hold however the agent is started. An operator who sets either variable keeps
//! control: the agent then leaves that setting to glibc.

/// Most malloc arenas the agent lets glibc create.
pub const ARENA_MAX: i32 = 2;
/// Allocations of this size and larger get their own mapping.
pub const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// What [`tune_for_gateway`] did with each setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Applied by the agent.
    Applied,
    /// The operator's environment variable sets it; left to glibc.
    FromEnvironment,
    /// Not a glibc target, or glibc refused the value.
    Unavailable,
}

/// The outcome for the arena limit and the mmap threshold, for the startup log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorTuning {
    pub arena_max: Setting,
    pub mmap_threshold: Setting,
}

/// Applies [`ARENA_MAX`] and [`MMAP_THRESHOLD_BYTES`] unless `MALLOC_ARENA_MAX` or
/// `MALLOC_MMAP_THRESHOLD_` is set. Call it first thing in `main`, before any thread
/// starts: arenas already created stay.
pub fn tune_for_gateway() -> AllocatorTuning {
    AllocatorTuning {
        arena_max: apply("MALLOC_ARENA_MAX", MallocOption::ArenaMax, ARENA_MAX),
        mmap_threshold: apply(
            "MALLOC_MMAP_THRESHOLD_",
            MallocOption::MmapThreshold,
            MMAP_THRESHOLD_BYTES,
        ),
    }
}

#[derive(Clone, Copy)]
enum MallocOption {
    ArenaMax,
    MmapThreshold,
}

fn apply(variable: &str, option: MallocOption, value: i32) -> Setting {
    if std::env::var_os(variable).is_some() {
        return Setting::FromEnvironment;
    }
    set(option, value)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(option: MallocOption, value: i32) -> Setting {
    let parameter = match option {
        MallocOption::ArenaMax => libc::M_ARENA_MAX,
        MallocOption::MmapThreshold => libc::M_MMAP_THRESHOLD,
    };
    // SAFETY: mallopt takes two integers and changes allocator parameters; glibc allows it
    // at any time and returns 0 when it refuses a value.
    if unsafe { libc::mallopt(parameter, value) } == 1 {
        Setting::Applied
    } else {
        Setting::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_option: MallocOption, _value: i32) -> Setting {
    Setting::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_variable_wins_over_the_agent_setting() {
        // PATH stands in for an operator's MALLOC_* variable: it is always set, and this
        // test changes neither the environment nor the allocator.
        assert_eq!(
            apply("PATH", MallocOption::ArenaMax, ARENA_MAX),
            Setting::FromEnvironment
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_both_settings() {
        assert_eq!(set(MallocOption::ArenaMax, ARENA_MAX), Setting::Applied);
        assert_eq!(
            set(MallocOption::MmapThreshold, MMAP_THRESHOLD_BYTES),
            Setting::Applied
        );
    }
}
