//! LoRA-family adapters (LoRA, LyCORIS LoKr and LoHa, weight differences) for Z-Image.
//!
//! [`LoraAdapter::open`] reads a file in any format people train in ([`file`]); [`resolve`]
//! matches a set of adapters, each at its scale, to the layers a model names ([`Target`]),
//! reporting every module that names no layer or has the wrong shape at once; the [`Resolved`]
//! set gives each layer's change ([`zimage_nn::WeightDelta`]), computed when the layer asks, which
//! [`zimage_nn::Linear::set_delta`] applies.

mod error;
pub mod file;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

pub use error::LoraError;
pub use file::{AdapterKind, AdapterModule, Factor, LoraAdapter, Matrix};
use zimage_nn::WeightDelta;

/// A layer adapters may change, under one of the names the model's files use for it.
///
/// A model's own layers are targets of one part (`layers.0.attention.to_q` -> itself, all rows);
/// names of another layout add targets of several (ComfyUI's fused `layers.0.attention.qkv` ->
/// the rows of `to_q`, `to_k` and `to_v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// `[out, in]` of the weight under this name.
    pub shape: [usize; 2],
    /// The model's layers it covers and which of its rows each gets.
    pub parts: Vec<(String, Range<usize>)>,
}

impl Target {
    /// One of the model's own layers.
    pub fn layer(path: impl Into<String>, shape: [usize; 2]) -> Self {
        let path = path.into();
        Self {
            parts: vec![(path.clone(), 0..shape[0])],
            name: path,
            shape,
        }
    }

    fn is_layer(&self) -> bool {
        self.parts.len() == 1 && self.parts[0].0 == self.name
    }
}

/// Names compared with `.` and `_` as one separator: kohya writes
/// `layers_0_attention_to_q`, the dot format `layers.0.attention.to.q`, the model
/// `layers.0.attention.to_q`.
pub(crate) fn canonical(name: &str) -> String {
    name.replace('.', "_")
}

/// What [`resolve`] made of one adapter.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    pub file: PathBuf,
    pub scale: f32,
    /// Modules applied.
    pub applied: usize,
    /// Tensors and modules read but not applied, each with why.
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone)]
struct Piece {
    adapter: usize,
    module: usize,
    rows: Range<usize>,
}

/// Adapters matched to a model: each layer's change on request.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    adapters: Vec<(Arc<LoraAdapter>, f32)>,
    pieces: BTreeMap<String, Vec<Piece>>,
    reports: Vec<AdapterReport>,
}

impl Resolved {
    /// No adapters.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The layers that change.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.pieces.keys().map(String::as_str)
    }

    pub fn reports(&self) -> &[AdapterReport] {
        &self.reports
    }

    /// The adapters and their scales.
    pub fn adapters(&self) -> &[(Arc<LoraAdapter>, f32)] {
        &self.adapters
    }

    /// The change to layer `path` (every adapter's, at its scale), `None` if none touches it.
    pub fn delta(&self, path: &str) -> Option<WeightDelta> {
        let pieces = self.pieces.get(path)?;
        WeightDelta::sum(pieces.iter().map(|p| {
            let (adapter, scale) = &self.adapters[p.adapter];
            adapter.modules()[p.module].delta(p.rows.clone(), *scale)
        }))
    }
}

/// Matches `adapters` (each with the user's scale) to `targets`.
///
/// A module names a target by any spelling of its name (see [`canonical`]). Where a file holds
/// both a model layer's own module and another layout's module covering it (the dot format's
/// fused `qkv` beside `to_q`), the layer's own wins and the other is reported as a duplicate,
/// as diffusers treats them. Every module naming no target and every shape mismatch is
/// reported at once.
pub fn resolve(
    adapters: &[(Arc<LoraAdapter>, f32)],
    targets: &[Target],
) -> Result<Resolved, LoraError> {
    let mut by_name: HashMap<String, &Target> = HashMap::new();
    // The model's own layers first: they win a (theoretical) clash of spellings.
    for target in targets.iter().filter(|t| t.is_layer()) {
        by_name.entry(canonical(&target.name)).or_insert(target);
    }
    for target in targets.iter().filter(|t| !t.is_layer()) {
        by_name.entry(canonical(&target.name)).or_insert(target);
    }
    let mut resolved = Resolved {
        adapters: adapters.to_vec(),
        ..Default::default()
    };
    for (index, (adapter, scale)) in adapters.iter().enumerate() {
        let mut unmatched = Vec::new();
        let mut wrong_shape = Vec::new();
        let mut matched = Vec::new();
        for (m, module) in adapter.modules().iter().enumerate() {
            match by_name.get(&canonical(&module.name)) {
                None => unmatched.push(module.name.clone()),
                Some(t) if t.shape != module.shape() => {
                    wrong_shape.push((module.name.clone(), t.shape, module.shape()))
                }
                Some(t) => matched.push((m, *t)),
            }
        }
        if !unmatched.is_empty() || !wrong_shape.is_empty() {
            return Err(LoraError::DoesNotFit {
                file: adapter.file().to_path_buf(),
                unmatched,
                wrong_shape,
            });
        }
        let own: HashSet<&str> = matched
            .iter()
            .filter(|(_, t)| t.is_layer())
            .map(|(_, t)| t.name.as_str())
            .collect();
        let mut ignored = adapter.ignored().to_vec();
        let mut applied = 0;
        for (m, target) in matched {
            let name = &adapter.modules()[m].name;
            if !target.is_layer() {
                if let Some((dup, _)) = target.parts.iter().find(|(p, _)| own.contains(p.as_str()))
                {
                    ignored.push(format!(
                        "{name} (a duplicate of {dup}, which the file also has)"
                    ));
                    continue;
                }
            }
            applied += 1;
            for (path, rows) in &target.parts {
                resolved
                    .pieces
                    .entry(path.clone())
                    .or_default()
                    .push(Piece {
                        adapter: index,
                        module: m,
                        rows: rows.clone(),
                    });
            }
        }
        resolved.reports.push(AdapterReport {
            file: adapter.file().to_path_buf(),
            scale: *scale,
            applied,
            ignored,
        });
    }
    Ok(resolved)
}

/// `FILE[:SCALE]` as the command line takes adapters (scale 1 by default). The scale is what
/// follows the last `:` when that parses as a number, so paths with colons still work.
pub fn parse_spec(spec: &str) -> Result<(PathBuf, f32), String> {
    if let Some((path, scale)) = spec.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f32>() {
            if !scale.is_finite() {
                return Err(format!("{spec}: the scale {scale} is not a finite number"));
            }
            if path.is_empty() {
                return Err(format!("{spec}: no file before the scale"));
            }
            return Ok((PathBuf::from(path), scale));
        }
    }
    if spec.is_empty() {
        return Err("an empty adapter path".to_string());
    }
    Ok((PathBuf::from(spec), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_take_an_optional_scale_after_the_last_colon() {
        assert_eq!(
            parse_spec("a.safetensors").unwrap(),
            ("a.safetensors".into(), 1.0)
        );
        assert_eq!(
            parse_spec("a.safetensors:0.6").unwrap(),
            ("a.safetensors".into(), 0.6)
        );
        assert_eq!(
            parse_spec("a.safetensors:-1").unwrap(),
            ("a.safetensors".into(), -1.0)
        );
        assert_eq!(parse_spec("C:\\loras\\a.safetensors").unwrap().1, 1.0);
        assert_eq!(
            parse_spec("dir:x/a.safetensors:2").unwrap(),
            ("dir:x/a.safetensors".into(), 2.0)
        );
        assert!(parse_spec(":0.5").is_err());
        assert!(parse_spec("a:inf").is_err());
        assert!(parse_spec("").is_err());
    }

    #[test]
    fn kohya_dot_and_model_spellings_meet() {
        for name in [
            "layers_0_attention_to_q",
            "layers.0.attention.to.q",
            "layers.0.attention.to_q",
        ] {
            assert_eq!(
                canonical(name),
                canonical("layers.0.attention.to_q"),
                "{name}"
            );
        }
        assert_ne!(
            canonical("layers.0.attention.to_out.0"),
            canonical("layers.0.attention.out")
        );
    }

    #[test]
    fn low_rank_parts_sum_to_the_product_of_their_stacks() {
        let a = WeightDelta::low_rank(2, 3, vec![1.0, 2.0], vec![1.0, 0.0, -1.0]);
        let b = WeightDelta::dense(2, 3, vec![0.5; 6]);
        let c = WeightDelta::low_rank(
            2,
            3,
            vec![3.0, 0.0, 0.0, 1.0],
            vec![0.0, 1.0, 0.0, 2.0, 2.0, 2.0],
        );
        let stacked = WeightDelta::sum([a.clone(), c.clone()]).unwrap();
        assert_eq!(stacked.rank(), Some(3));
        let mut want = a.to_dense();
        c.add_to(&mut want);
        assert_eq!(stacked.to_dense(), want);
        let mixed = WeightDelta::sum([a.clone(), b.clone()]).unwrap();
        assert_eq!(mixed.rank(), None);
        let mut want = a.to_dense();
        b.add_to(&mut want);
        assert_eq!(mixed.to_dense(), want);
    }
}
