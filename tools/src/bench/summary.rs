//! Medians and spreads of repeated runs.

/// Errors summarizing samples.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SummaryError {
    /// A sample was NaN or infinite.
    #[error("sample {0} is not a finite number")]
    NotFinite(f64),
}

/// Median and min–max of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Samples.
    pub n: usize,
}

impl Spread {
    /// Summarizes `samples`; `Ok(None)` when there are none.
    pub fn of(samples: &[f64]) -> Result<Option<Spread>, SummaryError> {
        if let Some(bad) = samples.iter().find(|v| !v.is_finite()) {
            return Err(SummaryError::NotFinite(*bad));
        }
        if samples.is_empty() {
            return Ok(None);
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Ok(Some(Spread {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        }))
    }

    /// `median (min–max)`, or just the median for one sample, with
    /// `decimals` digits.
    pub fn cell(&self, decimals: usize) -> String {
        if self.n == 1 || self.min == self.max {
            format!("{:.*}", decimals, self.median)
        } else {
            format!(
                "{:.*} ({:.*}–{:.*})",
                decimals, self.median, decimals, self.min, decimals, self.max
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap().unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap().unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!(s.cell(1), "3.0 (1.0–10.0)");
        let one = Spread::of(&[1.234]).unwrap().unwrap();
        assert_eq!(one.cell(2), "1.23");
        assert_eq!(Spread::of(&[]), Ok(None));
        assert_eq!(
            Spread::of(&[1.0, f64::NAN]).unwrap_err().to_string(),
            "sample NaN is not a finite number"
        );
    }
}
