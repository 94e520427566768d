//! The part each LoRA plays in a render, and the rules a set of them follows (the rendering
//! pipeline this tool serves, whose recommended set and limits these are):
//!
//! - at most 3 LoRAs besides the LCM-LoRA and the motion LoRA ("Do not exceed 3 total LoRAs");
//!   a LoRA given without a role counts among those 3;
//! - at most one character LoRA ("Only use one character LoRA");
//! - at most one motion LoRA ("Use only one at a time") and one LCM-LoRA (the pipeline loads one);
//! - a weight outside its role's recommended range is a warning that names the range: style
//!   0.7-0.85 (the primary style LoRA) or 0.15-0.3 (the flat-color stability LoRA), character
//!   0.6-0.8, utility 0.1-0.2, LCM 1.0, motion 1.0 (or the author's recommendation). A LoRA without
//!   a role is checked against the count limits only.
//!
//! Breaking a count rule is an `Error::Input` naming the rule and the files; `check` gathers every
//! broken rule into that one error, and returns the weight warnings otherwise.

use std::fmt;
use std::str::FromStr;

use super::LoraSpec;
use crate::error::{Error, Result};

/// The part a LoRA plays in a render.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An anime style LoRA (the primary style, or the flat-color stabiliser).
    Style,
    /// A character's identity.
    Character,
    /// A small utility / aesthetic LoRA.
    Utility,
    /// The LCM-LoRA that makes 4-6 step sampling work.
    Lcm,
    /// An AnimateDiff motion LoRA (camera pan, zoom, ...), merged into the motion modules.
    Motion,
}

/// At most this many LoRAs besides the LCM-LoRA and the motion LoRA.
pub const MAX_GENERAL: usize = 3;

impl Role {
    pub const ALL: [Role; 5] = [Role::Style, Role::Character, Role::Utility, Role::Lcm, Role::Motion];

    /// The name the CLI and the render config use.
    pub fn name(self) -> &'static str {
        match self {
            Role::Style => "style",
            Role::Character => "character",
            Role::Utility => "utility",
            Role::Lcm => "lcm",
            Role::Motion => "motion",
        }
    }

    /// The recommended weights: one or more closed ranges, each with what it is for.
    pub fn ranges(self) -> &'static [(f64, f64, &'static str)] {
        match self {
            Role::Style => &[(0.7, 0.85, "the primary style LoRA"), (0.15, 0.3, "a flat-color stability LoRA")],
            Role::Character => &[(0.6, 0.8, "a character LoRA")],
            Role::Utility => &[(0.1, 0.2, "a utility LoRA")],
            Role::Lcm => &[(1.0, 1.0, "the LCM-LoRA")],
            Role::Motion => &[(1.0, 1.0, "a motion LoRA, unless its author recommends another")],
        }
    }

    /// Whether `weight` lies in one of the recommended ranges (a little slack for decimal input).
    pub fn recommends(self, weight: f64) -> bool {
        const SLACK: f64 = 1e-9;
        self.ranges().iter().any(|(lo, hi, _)| weight >= lo - SLACK && weight <= hi + SLACK)
    }

    /// Whether LoRAs of this role count among the `MAX_GENERAL`.
    fn is_general(self) -> bool {
        !matches!(self, Role::Lcm | Role::Motion)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = Error;

    /// One of `style`, `character`, `utility`, `lcm`, `motion` (any case).
    fn from_str(s: &str) -> Result<Role> {
        let lower = s.trim().to_ascii_lowercase();
        Role::ALL.into_iter().find(|r| r.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
            Error::Input(format!("unknown LoRA role '{s}' (roles: {})", names.join(", ")))
        })
    }
}

/// `file (role)` or `file (no role)`, for messages.
fn describe(spec: &LoraSpec) -> String {
    match spec.role {
        Some(role) => format!("{} ({role})", spec.path.display()),
        None => format!("{} (no role)", spec.path.display()),
    }
}

/// Checks a set of LoRAs against the rules of the module doc: Ok with one warning per weight
/// outside its role's range, or one `Error::Input` naming every broken count rule and its files.
pub fn check(specs: &[LoraSpec]) -> Result<Vec<String>> {
    let mut broken = Vec::new();
    let general: Vec<&LoraSpec> = specs.iter().filter(|s| s.role.is_none_or(Role::is_general)).collect();
    if general.len() > MAX_GENERAL {
        broken.push(format!(
            "at most {MAX_GENERAL} LoRAs besides the LCM-LoRA and the motion LoRA (a LoRA without a role counts \
             among them), and {} are given: {}",
            general.len(),
            general.iter().map(|s| describe(s)).collect::<Vec<_>>().join(", ")
        ));
    }
    for (role, what) in [(Role::Character, "character LoRA"), (Role::Motion, "motion LoRA"), (Role::Lcm, "LCM-LoRA")] {
        let of_role: Vec<String> =
            specs.iter().filter(|s| s.role == Some(role)).map(|s| s.path.display().to_string()).collect();
        if of_role.len() > 1 {
            broken.push(format!("at most one {what}, and {} are given: {}", of_role.len(), of_role.join(", ")));
        }
    }
    if !broken.is_empty() {
        return Err(Error::Input(format!("LoRA roles: {}", broken.join("; "))));
    }
    let mut warnings = Vec::new();
    for spec in specs {
        let Some(role) = spec.role else { continue };
        let mut weights = vec![("weight", spec.unet)];
        if spec.text_encoder != spec.unet {
            weights = vec![("UNet weight", spec.unet), ("text-encoder weight", spec.text_encoder)];
        }
        for (which, w) in weights {
            if !role.recommends(w) {
                let ranges: Vec<String> = role
                    .ranges()
                    .iter()
                    .map(
                        |(lo, hi, what)| {
                            if lo == hi { format!("{lo} for {what}") } else { format!("{lo}-{hi} for {what}") }
                        },
                    )
                    .collect();
                warnings.push(format!(
                    "WARNING: LoRA {}: {which} {w} is outside the recommended {}",
                    describe(spec),
                    ranges.join(" or ")
                ));
            }
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn lora(name: &str, role: Option<Role>, weight: f64) -> LoraSpec {
        LoraSpec { path: PathBuf::from(name), unet: weight, text_encoder: weight, role }
    }

    fn input_error(specs: &[LoraSpec]) -> String {
        match check(specs) {
            Err(Error::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn roles_parse_by_name_in_any_case_and_unknown_ones_are_input_errors() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
            assert_eq!(role.name().to_uppercase().parse::<Role>().unwrap(), role);
        }
        let e = "stlye".parse::<Role>().unwrap_err();
        assert!(matches!(&e, Error::Input(m) if m.contains("'stlye'") && m.contains("style, character")), "{e}");
    }

    #[test]
    fn the_pipeline_set_passes_without_warnings() {
        // The recommended set: style 0.8, flat color 0.25, a character 0.7, the LCM-LoRA 1.0, a motion LoRA 1.0
        let specs = [
            lora("pastel.safetensors", Some(Role::Style), 0.8),
            lora("flat.safetensors", Some(Role::Style), 0.25),
            lora("hero.safetensors", Some(Role::Character), 0.7),
            lora("lcm.safetensors", Some(Role::Lcm), 1.0),
            lora("pan.safetensors", Some(Role::Motion), 1.0),
        ];
        assert_eq!(check(&specs).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_fourth_lora_besides_lcm_and_motion_is_an_error_naming_the_rule_and_every_file() {
        let mut specs = vec![
            lora("a.safetensors", Some(Role::Style), 0.8),
            lora("b.safetensors", Some(Role::Utility), 0.15),
            lora("c.safetensors", None, 0.5),
            lora("lcm.safetensors", Some(Role::Lcm), 1.0),
            lora("pan.safetensors", Some(Role::Motion), 1.0),
        ];
        assert!(check(&specs).is_ok(), "3 besides the LCM-LoRA and the motion LoRA");
        specs.push(lora("d.safetensors", Some(Role::Character), 0.7));
        let m = input_error(&specs);
        assert!(m.contains("at most 3 LoRAs besides the LCM-LoRA and the motion LoRA"), "{m}");
        for part in ["a.safetensors (style)", "b.safetensors (utility)", "c.safetensors (no role)", "d.safetensors"] {
            assert!(m.contains(part), "'{part}' in: {m}");
        }
        assert!(!m.contains("lcm.safetensors") && !m.contains("pan.safetensors"), "{m}");
    }

    #[test]
    fn loras_without_a_role_count_but_get_no_weight_warning() {
        let specs: Vec<LoraSpec> = (0..3).map(|i| lora(&format!("{i}.safetensors"), None, 5.0)).collect();
        assert_eq!(check(&specs).unwrap(), Vec::<String>::new());
        let four: Vec<LoraSpec> = (0..4).map(|i| lora(&format!("{i}.safetensors"), None, 1.0)).collect();
        assert!(input_error(&four).contains("4 are given"));
    }

    #[test]
    fn two_character_two_motion_or_two_lcm_loras_are_errors() {
        for (role, rule) in
            [(Role::Character, "one character LoRA"), (Role::Motion, "one motion LoRA"), (Role::Lcm, "one LCM-LoRA")]
        {
            let w = role.ranges()[0].0;
            let specs = [lora("x.safetensors", Some(role), w), lora("y.safetensors", Some(role), w)];
            let m = input_error(&specs);
            assert!(m.contains(&format!("at most {rule}")) && m.contains("x.safetensors, y.safetensors"), "{m}");
        }
    }

    #[test]
    fn every_broken_rule_is_in_the_one_error() {
        let specs = [
            lora("c1", Some(Role::Character), 0.7),
            lora("c2", Some(Role::Character), 0.7),
            lora("s1", Some(Role::Style), 0.8),
            lora("s2", Some(Role::Style), 0.2),
        ];
        let m = input_error(&specs);
        assert!(m.contains("at most 3 LoRAs") && m.contains("at most one character LoRA"), "{m}");
    }

    #[test]
    fn weights_outside_the_role_range_warn_with_the_range() {
        let cases = [
            (Role::Style, 0.5, "0.7-0.85 for the primary style LoRA or 0.15-0.3 for a flat-color stability LoRA"),
            (Role::Character, 0.9, "0.6-0.8"),
            (Role::Utility, 0.3, "0.1-0.2"),
            (Role::Lcm, 0.8, "1 for the LCM-LoRA"),
            (Role::Motion, 1.2, "1 for a motion LoRA"),
        ];
        for (role, weight, range) in cases {
            let w = check(&[lora("f.safetensors", Some(role), weight)]).unwrap();
            assert_eq!(w.len(), 1, "{role}: {w:?}");
            assert!(w[0].contains(&format!("f.safetensors ({role})")) && w[0].contains(&format!("weight {weight}")));
            assert!(w[0].contains(range), "'{range}' in: {}", w[0]);
            // the range ends themselves are recommended
            for (lo, hi, _) in role.ranges() {
                assert!(check(&[lora("f", Some(role), *lo)]).unwrap().is_empty(), "{role} {lo}");
                assert!(check(&[lora("f", Some(role), *hi)]).unwrap().is_empty(), "{role} {hi}");
            }
        }
        // a UNet / text-encoder pair: each weight checked
        let mut spec = lora("f", Some(Role::Character), 0.7);
        spec.text_encoder = 1.0;
        let w = check(&[spec]).unwrap();
        assert!(w.len() == 1 && w[0].contains("text-encoder weight 1"), "{w:?}");
    }
}
