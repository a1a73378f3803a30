//! Re-deriving coarser rollups from finer ones.
//!
//! Why this works exactly: [`Summary::merge`] is associative and commutative, and merging
//! the summaries of a split of the readings gives the summary of all of them (count, min,
//! max, first, last and the sketch's buckets exactly; the sum up to rounding). So the 1 h
//! rollup of a series is the merge of its sixty 1 min rollups, and a new resolution can be
//! added, or a damaged coarse table rebuilt, from a finer table without the raw data.

use std::collections::BTreeMap;

use tributary_protocol::Summary;

use super::ProcessError;

/// Merges windows of width `fine_resolution_ms` into windows of width
/// `coarse_resolution_ms`, which must be a positive multiple of it. Input is
/// `(window_start_ms, summary)` of one series, in any order; output is sorted by window
/// start. A fine window that does not start on a fine boundary is refused, because it
/// could straddle two coarse windows.
pub fn coarsen<'a>(
    fine_windows: impl IntoIterator<Item = (i64, &'a Summary)>,
    fine_resolution_ms: i64,
    coarse_resolution_ms: i64,
) -> Result<Vec<(i64, Summary)>, ProcessError> {
    if fine_resolution_ms <= 0
        || coarse_resolution_ms <= 0
        || coarse_resolution_ms % fine_resolution_ms != 0
    {
        return Err(ProcessError::ResolutionsNotNested {
            fine_resolution_ms,
            coarse_resolution_ms,
        });
    }
    let mut coarse: BTreeMap<i64, Summary> = BTreeMap::new();
    for (window_start_ms, summary) in fine_windows {
        if window_start_ms.rem_euclid(fine_resolution_ms) != 0 {
            return Err(ProcessError::MisalignedWindow {
                window_start_ms,
                resolution_ms: fine_resolution_ms,
            });
        }
        let coarse_start_ms = window_start_ms - window_start_ms.rem_euclid(coarse_resolution_ms);
        coarse
            .entry(coarse_start_ms)
            .or_insert_with(Summary::empty)
            .merge(summary);
    }
    Ok(coarse.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_resolutions_that_do_not_nest_and_misaligned_windows() {
        let summary = Summary::from_reading(0, 1.0);
        assert!(matches!(
            coarsen([(0, &summary)], 60_000, 90_000),
            Err(ProcessError::ResolutionsNotNested { .. })
        ));
        assert!(matches!(
            coarsen([(30_000, &summary)], 60_000, 120_000),
            Err(ProcessError::MisalignedWindow { .. })
        ));
    }

    #[test]
    fn merges_fine_windows_into_the_coarse_window_containing_them() {
        let windows: Vec<(i64, Summary)> = (-3..5)
            .map(|minute| {
                (
                    minute * 60_000,
                    Summary::from_reading(minute * 60_000 + 1, minute as f64),
                )
            })
            .collect();
        let coarse = coarsen(
            windows.iter().map(|(start, summary)| (*start, summary)),
            60_000,
            120_000,
        )
        .unwrap();
        let starts: Vec<i64> = coarse.iter().map(|(start, _)| *start).collect();
        assert_eq!(starts, vec![-240_000, -120_000, 0, 120_000, 240_000]);
        assert_eq!(coarse[0].1.count, 1);
        assert_eq!(coarse[1].1.count, 2);
        assert_eq!((coarse[1].1.min, coarse[1].1.max), (-2.0, -1.0));
    }
}
