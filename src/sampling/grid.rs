//! The numpy routines diffusers builds its timestep and sigma grids with, reproduced operation by
//! operation so that our grids equal diffusers' (numpy 2.x): `arange` with a float step,
//! `linspace`, `interp` over the 1000 training timesteps, and `round` (half to even). The
//! rounding of each intermediate matters where a grid value lands on .5 or an arange overshoots.

/// `numpy.arange(start, stop, step)` for float arguments. The length is
/// `ceil((stop - start) / step)`; numpy writes `start` and `start + step`, then fills element `i`
/// with `start + i * (second - start)` (numpy `DOUBLE_fill`), so the effective step is the
/// rounded difference of the first two values, not `step` itself.
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.linspace(start, stop, num, endpoint)`: `i * step + start` with `step = (stop - start) /
/// div` (div = num - 1 with the endpoint, num without), and the last value set to `stop` exactly
/// when the endpoint is included.
pub(crate) fn linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div as f64 * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        (0..num).map(|i| i as f64 * delta + start).collect()
    };
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `numpy.interp(x, arange(len(fp)), fp)`: linear interpolation of a table indexed by integer
/// training timesteps, clamped to the end values outside it (numpy `arr_interp`).
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    if j as f64 == x {
        return y0;
    }
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - j as f64) + y0;
    if r.is_nan() {
        let r = slope * (x - (j + 1) as f64) + y1;
        if r.is_nan() && y0 == y1 { y0 } else { r }
    } else {
        r
    }
}

/// `numpy.round`: half to even.
pub(crate) fn round(x: f64) -> f64 {
    x.round_ties_even()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_overshoots_like_numpy() {
        // 1000 / (1000 / 61) is a hair above 61, so numpy yields 62 values, the last ~0.
        let a = arange(1000.0, 0.0, -(1000.0 / 61.0));
        assert_eq!(a.len(), 62);
        assert!(a[61].abs() < 1e-9);
        assert_eq!(arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert!(arange(0.0, 1.0, -1.0).is_empty());
    }

    #[test]
    fn linspace_ends() {
        assert_eq!(linspace(0.0, 1.0, 1, true), vec![0.0]);
        assert_eq!(linspace(0.0, 999.0, 3, true), vec![0.0, 499.5, 999.0]);
        assert_eq!(linspace(0.0, 50.0, 4, false), vec![0.0, 12.5, 25.0, 37.5]);
    }

    #[test]
    fn interp_clamps_and_hits_nodes() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(1.0, &fp), 2.0);
        assert_eq!(interp(1.5, &fp), 3.0);
        assert_eq!(interp(7.0, &fp), 4.0);
        assert_eq!(round(0.5), 0.0);
        assert_eq!(round(1.5), 2.0);
    }
}
