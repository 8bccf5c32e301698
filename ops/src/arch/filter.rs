//! The connectivity filter: an acceptance box on effective depth and width over a search space
//! (`docs/methods/connectivity.md` §3).

use serde::Serialize;

use super::paths::{path_proxies, Cell, CellKind, PathProxies};
use super::ArchError;

/// Slack on the box edges so that values on the boundary survive rounding.
const EDGE_SLACK: f64 = 1e-9;

/// `docs/methods/connectivity.md` §3, in its terms: centres and half-ranges r of d_bar and
/// m_bar; an architecture is kept iff |d_bar - centre_d| <= r_d / 2 and |m_bar - centre_m| <= r_m / 2.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AcceptanceBox {
    pub centre_d: f64,
    pub centre_m: f64,
    pub r_d: f64,
    pub r_m: f64,
}

impl AcceptanceBox {
    pub fn new(centre_d: f64, centre_m: f64, r_d: f64, r_m: f64) -> Result<Self, ArchError> {
        let all = [centre_d, centre_m, r_d, r_m];
        if all.iter().any(|v| !v.is_finite()) || r_d < 0.0 || r_m < 0.0 {
            return Err(ArchError::invalid(
                "box",
                format!("{all:?} must be finite [centre_d, centre_m, r_d, r_m] with r_d, r_m >= 0"),
            ));
        }
        Ok(Self {
            centre_d,
            centre_m,
            r_d,
            r_m,
        })
    }

    /// The box whose accepted intervals are exactly [d_lo, d_hi] x [m_lo, m_hi].
    pub fn from_intervals(d: (f64, f64), m: (f64, f64)) -> Self {
        Self {
            centre_d: (d.0 + d.1) / 2.0,
            centre_m: (m.0 + m.1) / 2.0,
            r_d: d.1 - d.0,
            r_m: m.1 - m.0,
        }
    }

    /// `docs/methods/connectivity.md` §3, stated NAS-Bench-201 box: centre (1.6, 2.2), half-radius
    /// (0.7, 0.9), the half-radius being r / 2.
    pub fn paper_nb201() -> Self {
        Self::from_intervals((1.6 - 0.7, 1.6 + 0.7), (2.2 - 0.9, 2.2 + 0.9))
    }

    /// `docs/methods/connectivity.md` §3, the reference code's hard-coded NAS-Bench-201 box:
    /// d_bar in [0.99, 2.51], m_bar in [0.99, 3.01].
    pub fn reference_nb201() -> Self {
        Self::from_intervals((0.99, 2.51), (0.99, 3.01))
    }

    /// `docs/methods/connectivity.md` §3: centre = midpoint and r = half of the range of d_bar and
    /// m_bar over the architectures that have both (a path, and d_bar > 0). `None` if none do.
    pub fn from_space<'a>(proxies: impl IntoIterator<Item = &'a PathProxies>) -> Option<Self> {
        let mut d = (f64::INFINITY, f64::NEG_INFINITY);
        let mut m = (f64::INFINITY, f64::NEG_INFINITY);
        let mut any = false;
        for p in proxies {
            let Some(mb) = p.m_bar else { continue };
            any = true;
            d = (d.0.min(p.d_bar), d.1.max(p.d_bar));
            m = (m.0.min(mb), m.1.max(mb));
        }
        any.then(|| Self {
            centre_d: (d.0 + d.1) / 2.0,
            centre_m: (m.0 + m.1) / 2.0,
            r_d: (d.1 - d.0) / 2.0,
            r_m: (m.1 - m.0) / 2.0,
        })
    }

    /// The accepted interval of d_bar.
    pub fn d_interval(&self) -> (f64, f64) {
        (
            self.centre_d - self.r_d / 2.0,
            self.centre_d + self.r_d / 2.0,
        )
    }

    /// The accepted interval of m_bar.
    pub fn m_interval(&self) -> (f64, f64) {
        (
            self.centre_m - self.r_m / 2.0,
            self.centre_m + self.r_m / 2.0,
        )
    }

    /// `docs/methods/connectivity.md` §3: |d_bar - c_d| <= r_d / 2 and |m_bar - c_m| <= r_m / 2;
    /// cells without a parameterised path (m_bar undefined) are rejected.
    pub fn accepts(&self, p: &PathProxies) -> bool {
        let Some(m) = p.m_bar else { return false };
        (p.d_bar - self.centre_d).abs() <= self.r_d / 2.0 + EDGE_SLACK
            && (m - self.centre_m).abs() <= self.r_m / 2.0 + EDGE_SLACK
    }
}

/// Every NAS-Bench-201 cell (5^6 = 15,625), in the order of their six digits.
pub fn nb201_space() -> Result<Vec<Cell>, ArchError> {
    (0..15_625u32)
        .map(|code| {
            let mut d = [0u8; 6];
            let mut c = code;
            for slot in d.iter_mut().rev() {
                *slot = (c % 5) as u8;
                c /= 5;
            }
            let s: Vec<char> = d.iter().map(|x| char::from(b'0' + x)).collect();
            let digits = format!("{}_{}{}_{}{}{}", s[0], s[1], s[2], s[3], s[4], s[5]);
            Cell::parse(CellKind::Nb201, "space", &digits)
        })
        .collect()
}

/// One architecture's filter verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FilterEntry {
    /// Digit form.
    pub topology: String,
    /// NAS-Bench-201 arch string (NB201 cells only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    pub num_paths: usize,
    pub d_bar: Option<f64>,
    pub m_bar: Option<f64>,
    pub accepted: bool,
}

/// The outcome of filtering a space.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FilterReport {
    /// The box used; `from_space` says whether it was computed (true) or given.
    #[serde(rename = "box")]
    pub acceptance: AcceptanceBox,
    pub from_space: bool,
    pub d_interval: (f64, f64),
    pub m_interval: (f64, f64),
    pub space_size: usize,
    /// Architectures with a path and a parameterised layer on one (m_bar defined).
    pub num_scorable: usize,
    pub num_accepted: usize,
    /// num_accepted / space_size.
    pub fraction_kept: f64,
    pub accepted: Vec<FilterEntry>,
}

/// Applies the filter to `cells`: the given box, or the §3 box computed from the cells.
pub fn filter_space(
    cells: &[Cell],
    given: Option<AcceptanceBox>,
) -> Result<FilterReport, ArchError> {
    let mut proxies = Vec::with_capacity(cells.len());
    for c in cells {
        proxies.push(path_proxies(&c.paths()?));
    }
    let (acceptance, from_space) = match given {
        Some(b) => (b, false),
        None => (
            AcceptanceBox::from_space(proxies.iter().flatten()).ok_or_else(|| {
                ArchError::invalid(
                    "space",
                    "no architecture in the space has a parameterised path, so the box cannot \
                     be computed from it; give `box` explicitly",
                )
            })?,
            true,
        ),
    };
    let num_scorable = proxies
        .iter()
        .flatten()
        .filter(|p| p.m_bar.is_some())
        .count();
    let accepted: Vec<FilterEntry> = cells
        .iter()
        .zip(&proxies)
        .filter_map(|(c, p)| {
            let p = p.as_ref()?;
            acceptance.accepts(p).then(|| FilterEntry {
                topology: c.digits(),
                arch: (c.kind == CellKind::Nb201).then(|| c.nb201_arch()),
                num_paths: p.num_paths,
                d_bar: Some(p.d_bar),
                m_bar: p.m_bar,
                accepted: true,
            })
        })
        .collect();
    let space_size = cells.len();
    Ok(FilterReport {
        acceptance,
        from_space,
        d_interval: acceptance.d_interval(),
        m_interval: acceptance.m_interval(),
        space_size,
        num_scorable,
        num_accepted: accepted.len(),
        fraction_kept: if space_size == 0 {
            0.0
        } else {
            accepted.len() as f64 / space_size as f64
        },
        accepted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp(ts: &[&str]) -> Vec<Cell> {
        ts.iter()
            .map(|t| Cell::parse(CellKind::Mlp, "t", t).unwrap())
            .collect()
    }

    #[test]
    fn tiny_space_by_hand() {
        // (d_bar, m_bar): chain (3, 1/3); parallel (1, 3); mixed (1.25, 2.4);
        // dense "2_22_222" with d = 3, 2, 2, 1 -> (2, 2); all-skip: m_bar undefined; no path.
        let cells = mlp(&[
            "2_02_002", "1_10_222", "2_21_112", "2_22_222", "1_11_111", "2_00_000",
        ]);
        let r = filter_space(&cells, None).unwrap();
        // d range [1, 3]: centre 2, r 1 -> keep [1.5, 2.5]; m range [1/3, 3]: centre 5/3,
        // r 4/3 -> keep [1, 7/3].
        let b = r.acceptance;
        assert!((b.centre_d - 2.0).abs() < 1e-12 && (b.r_d - 1.0).abs() < 1e-12);
        assert!((b.centre_m - 5.0 / 3.0).abs() < 1e-12 && (b.r_m - 4.0 / 3.0).abs() < 1e-12);
        assert!((r.m_interval.0 - 1.0).abs() < 1e-12);
        assert_eq!(r.space_size, 6);
        assert_eq!(r.num_scorable, 4);
        let kept: Vec<&str> = r.accepted.iter().map(|e| e.topology.as_str()).collect();
        assert_eq!(kept, vec!["2_22_222"]);
        assert!((r.fraction_kept - 1.0 / 6.0).abs() < 1e-12);
        // A given box that spans the mixed cell too, boundary included (d = 1.25 exactly).
        let given = AcceptanceBox::from_intervals((1.25, 2.0), (2.0, 2.4));
        let r = filter_space(&cells, Some(given)).unwrap();
        let kept: Vec<&str> = r.accepted.iter().map(|e| e.topology.as_str()).collect();
        assert_eq!(kept, vec!["2_21_112", "2_22_222"]);
        assert!(!r.from_space);
    }

    #[test]
    fn nb201_box_from_the_space_is_the_papers() {
        let cells = nb201_space().unwrap();
        assert_eq!(cells.len(), 15_625);
        let r = filter_space(&cells, None).unwrap();
        // d_bar spans [1/4, 3] and m_bar [1/3, 4] over the space, so the computed box is
        // centre (1.625, 2.1667), r / 2 = (0.6875, 0.9167): the paper's (1.6, 2.2), (0.7, 0.9).
        let b = r.acceptance;
        assert!((b.centre_d - 1.625).abs() < 1e-12, "{b:?}");
        assert!((b.centre_m - 13.0 / 6.0).abs() < 1e-12, "{b:?}");
        assert!((b.r_d / 2.0 - 0.6875).abs() < 1e-12, "{b:?}");
        assert!((b.r_m / 2.0 - 11.0 / 12.0).abs() < 1e-12, "{b:?}");
        let paper = AcceptanceBox::paper_nb201();
        assert!((paper.centre_d - b.centre_d).abs() < 0.05);
        assert!((paper.r_m / 2.0 - b.r_m / 2.0).abs() < 0.05);
        assert!(r.num_accepted > 0 && r.num_accepted < r.num_scorable);
        assert!(r.accepted.iter().all(|e| e.arch.is_some()));
        // The reference code's box keeps part of the space too.
        let rr = filter_space(&cells, Some(AcceptanceBox::reference_nb201())).unwrap();
        assert!(rr.num_accepted > 0);
    }
}
