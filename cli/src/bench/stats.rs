//! Order statistics of benchmark samples: min, median, p90, max and mean,
//! and ratios of paired samples (A_i / B_i for the same run i).

use serde::{Deserialize, Serialize};

/// The summary of one series of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// 50th percentile.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// The `p`th percentile (0–100) of `sorted` (ascending), by linear
/// interpolation between the closest ranks (rank = p/100 · (n−1), as
/// numpy's default), so the median of an even count is the mean of the
/// middle two. `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = p.clamp(0.0, 100.0) / 100.0 * last as f64;
    // rank is within 0..=last, so the casts cannot truncate a real index.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let (a, b) = (sorted[lo], sorted[hi.min(last)]);
    Some(a + (b - a) * (rank - lo as f64))
}

/// Summarizes `samples` (any order; NaNs are ignored). `None` when there
/// is nothing to summarize.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Some(Summary {
        n,
        min: *sorted.first()?,
        median: percentile(&sorted, 50.0)?,
        p90: percentile(&sorted, 90.0)?,
        max: *sorted.last()?,
        mean: sorted.iter().sum::<f64>() / n as f64,
    })
}

/// Summarizes the samples that are present.
pub fn summarize_some(samples: &[Option<f64>]) -> Option<Summary> {
    let present: Vec<f64> = samples.iter().flatten().copied().collect();
    summarize(&present)
}

/// A_i / B_i for every run i where both were measured and B_i > 0.
pub fn paired_ratios(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter_map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) if *b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn odd_count() {
        let s = summarize(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.n, 5);
        assert!(close(s.min, 1.0));
        assert!(close(s.median, 3.0));
        // rank 0.9 · 4 = 3.6 → 4 + 0.6 · (5 − 4)
        assert!(close(s.p90, 4.6));
        assert!(close(s.max, 5.0));
        assert!(close(s.mean, 3.0));
    }

    #[test]
    fn even_count_median_is_mean_of_middle_two() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert!(close(s.median, 2.5));
    }

    #[test]
    fn p90_of_one_to_ten() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = summarize(&v).unwrap();
        // rank 0.9 · 9 = 8.1 → 9 + 0.1 · (10 − 9)
        assert!(close(s.p90, 9.1));
        assert!(close(s.median, 5.5));
        assert!(close(percentile(&v, 0.0).unwrap(), 1.0));
        assert!(close(percentile(&v, 100.0).unwrap(), 10.0));
    }

    #[test]
    fn single_sample_and_empty() {
        let s = summarize(&[7.0]).unwrap();
        assert!(close(s.min, 7.0) && close(s.median, 7.0) && close(s.p90, 7.0));
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[f64::NAN]).is_none());
        assert!(summarize_some(&[None, None]).is_none());
        assert!(close(
            summarize_some(&[None, Some(2.0), Some(4.0)])
                .unwrap()
                .median,
            3.0
        ));
    }

    #[test]
    fn ratios_are_per_pair() {
        let a = [Some(10.0), Some(20.0), None, Some(5.0)];
        let b = [Some(5.0), Some(4.0), Some(1.0), Some(0.0)];
        assert_eq!(paired_ratios(&a, &b), vec![2.0, 5.0]);
    }
}
