//! Reading adapter files: every naming people train in, down to one list of modules.
//!
//! Formats (see `shared/spec/zimage.md` §9): diffusers/PEFT (`transformer.<module>.lora_A.weight`,
//! `lora_alpha` in the `lora_adapter_metadata` header entry), PEFT with the adapter-name segment
//! (`lora_A.default.weight`), ai-toolkit and ComfyUI (`diffusion_model.` prefix, `.alpha`), kohya /
//! musubi-tuner (`lora_unet_layers_0_attention_to_q.lora_down.weight`), the dot format
//! (`to.q.lora.down.weight`), LyCORIS LoKr (`lokr_w1[_a|_b]`, `lokr_w2[_a|_b]`) and LoHa
//! (`hada_w1_a` ...), and whole-weight differences (`.diff`). Module names are kept as the file
//! spells them (prefix removed); [`crate::resolve`] matches them to the model's layers.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use zimage_nn::{Checkpoint, WeightDelta};

use crate::LoraError;

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl Matrix {
    fn matmul(&self, other: &Matrix) -> Matrix {
        let (n, k, m) = (self.rows, self.cols, other.cols);
        let mut values = vec![0f32; n * m];
        for i in 0..n {
            let row = &mut values[i * m..(i + 1) * m];
            for p in 0..k {
                let a = self.values[i * k + p];
                let b = &other.values[p * m..(p + 1) * m];
                row.iter_mut().zip(b).for_each(|(x, &b)| *x += a * b);
            }
        }
        Matrix {
            rows: n,
            cols: m,
            values,
        }
    }

    /// The Kronecker product: `[a, b] ⊗ [c, d]` is `[a·c, b·d]`.
    fn kron(&self, other: &Matrix) -> Matrix {
        let (rows, cols) = (self.rows * other.rows, self.cols * other.cols);
        let mut values = vec![0f32; rows * cols];
        for i in 0..self.rows {
            for j in 0..self.cols {
                let a = self.values[i * self.cols + j];
                for k in 0..other.rows {
                    let out = (i * other.rows + k) * cols + j * other.cols;
                    let b = &other.values[k * other.cols..(k + 1) * other.cols];
                    values[out..out + other.cols]
                        .iter_mut()
                        .zip(b)
                        .for_each(|(x, &b)| *x = a * b);
                }
            }
        }
        Matrix { rows, cols, values }
    }

    fn rows_scaled(&self, rows: Range<usize>, scale: f32) -> Vec<f32> {
        self.values[rows.start * self.cols..rows.end * self.cols]
            .iter()
            .map(|&v| v * scale)
            .collect()
    }
}

/// A LoKr factor: whole, or as the product of two low-rank matrices.
#[derive(Debug, Clone, PartialEq)]
pub enum Factor {
    Full(Matrix),
    Product(Matrix, Matrix),
}

impl Factor {
    fn shape(&self) -> [usize; 2] {
        match self {
            Factor::Full(m) => [m.rows, m.cols],
            Factor::Product(a, b) => [a.rows, b.cols],
        }
    }

    fn value(&self) -> Matrix {
        match self {
            Factor::Full(m) => m.clone(),
            Factor::Product(a, b) => a.matmul(b),
        }
    }

    fn rank(&self) -> Option<usize> {
        match self {
            Factor::Full(_) => None,
            Factor::Product(_, b) => Some(b.rows),
        }
    }
}

/// What one adapter module holds.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterKind {
    /// ΔW = up · down: `down [rank, in]` (`lora_A`, `lora_down`), `up [out, rank]`.
    LoRA { down: Matrix, up: Matrix },
    /// LyCORIS LoKr: ΔW = w1 ⊗ w2 (Kronecker product).
    LoKr { w1: Factor, w2: Factor },
    /// LyCORIS LoHa: ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b).
    LoHa {
        w1: (Matrix, Matrix),
        w2: (Matrix, Matrix),
    },
    /// ΔW itself (`.diff`).
    Diff(Matrix),
}

/// One module of an adapter file, named as the file names it (prefix removed).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule {
    pub name: String,
    pub kind: AdapterKind,
    /// The module's `alpha` (its `.alpha` tensor, else the PEFT metadata's `lora_alpha`).
    pub alpha: Option<f32>,
    /// rsLoRA (PEFT's `use_rslora`): the scale is `alpha / sqrt(rank)`.
    pub rank_stabilized: bool,
}

impl AdapterModule {
    /// The `[out, in]` of the weight it changes.
    pub fn shape(&self) -> [usize; 2] {
        match &self.kind {
            AdapterKind::LoRA { down, up } => [up.rows, down.cols],
            AdapterKind::LoKr { w1, w2 } => {
                let ([a, b], [c, d]) = (w1.shape(), w2.shape());
                [a * c, b * d]
            }
            AdapterKind::LoHa { w1, .. } => [w1.0.rows, w1.1.cols],
            AdapterKind::Diff(m) => [m.rows, m.cols],
        }
    }

    /// The module's own multiplier: `alpha / rank` (1 without an alpha). For LoKr the rank is
    /// that of the decomposed factor (w2's if both are), and a LoKr of two whole factors has
    /// none, as LyCORIS and ComfyUI define them.
    pub fn scale(&self) -> f32 {
        let rank = match &self.kind {
            AdapterKind::LoRA { down, .. } => Some(down.rows),
            AdapterKind::LoKr { w1, w2 } => w2.rank().or(w1.rank()),
            AdapterKind::LoHa { w1, .. } => Some(w1.1.rows),
            AdapterKind::Diff(_) => None,
        };
        match (self.alpha, rank) {
            (Some(alpha), Some(rank)) if rank > 0 && self.rank_stabilized => {
                alpha / (rank as f32).sqrt()
            }
            (Some(alpha), Some(rank)) if rank > 0 => alpha / rank as f32,
            _ => 1.0,
        }
    }

    /// The change to rows `rows` of the weight, times `scale` (the user's) and [`Self::scale`].
    pub fn delta(&self, rows: Range<usize>, scale: f32) -> WeightDelta {
        let factor = scale * self.scale();
        let [_, inp] = self.shape();
        if let AdapterKind::LoRA { down, up } = &self.kind {
            return WeightDelta::low_rank(
                rows.len(),
                inp,
                up.rows_scaled(rows, factor),
                down.values.clone(),
            );
        }
        let whole = match &self.kind {
            AdapterKind::LoKr { w1, w2 } => w1.value().kron(&w2.value()),
            AdapterKind::LoHa { w1, w2 } => {
                let (mut a, b) = (w1.0.matmul(&w1.1), w2.0.matmul(&w2.1));
                a.values
                    .iter_mut()
                    .zip(&b.values)
                    .for_each(|(x, &y)| *x *= y);
                a
            }
            AdapterKind::Diff(m) => m.clone(),
            AdapterKind::LoRA { .. } => unreachable!("returned above"),
        };
        WeightDelta::dense(rows.len(), inp, whole.rows_scaled(rows, factor))
    }
}

/// An adapter file, read.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    file: PathBuf,
    modules: Vec<AdapterModule>,
    ignored: Vec<String>,
}

/// Prefixes naming the transformer, removed from module names.
const MODEL_PREFIXES: &[&str] = &[
    "base_model.model.",
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_unet_",
    "unet.",
];

/// Prefixes of text-encoder modules: recognised, not applied (the text encoder takes no adapters).
const TEXT_ENCODER_PREFIXES: &[&str] = &[
    "text_encoder.",
    "text_encoders.",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "te.",
];

/// What a tensor is to its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Down,
    Up,
    Alpha,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    Diff,
}

/// `(suffix, part)`, longest first where one ends another.
const SUFFIXES: &[(&str, Part)] = &[
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
    (".lokr_w2", Part::LokrW2),
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".diff", Part::Diff),
];

/// Recognised tensors that are not applied (listed to the user).
const IGNORED_SUFFIXES: &[(&str, &str)] = &[
    (".dora_scale", "a DoRA magnitude"),
    (".lora_magnitude_vector", "a DoRA magnitude"),
    (".lora_A.bias", "a LoRA bias"),
    (".lora_B.bias", "a LoRA bias"),
    (".lora_down.bias", "a LoRA bias"),
    (".lora_up.bias", "a LoRA bias"),
    (".diff_b", "a bias difference"),
];

/// Recognised tensors whose modules cannot be applied.
const UNSUPPORTED_SUFFIXES: &[(&str, &str)] = &[
    (".lokr_t2", "a Tucker-decomposed LoKr factor (convolutions)"),
    (".hada_t1", "a Tucker-decomposed LoHa factor (convolutions)"),
    (".hada_t2", "a Tucker-decomposed LoHa factor (convolutions)"),
];

/// `key` without a PEFT adapter-name segment: `x.lora_A.default.weight` -> `x.lora_A.weight`.
fn without_adapter_name(key: &str) -> String {
    for tag in [".lora_A.", ".lora_B."] {
        if let Some(at) = key.find(tag) {
            let rest = &key[at + tag.len()..];
            if let Some(name) = rest.strip_suffix(".weight") {
                if !name.is_empty() && !name.contains('.') {
                    return format!("{}{tag}weight", &key[..at]);
                }
            }
        }
    }
    key.to_string()
}

fn strip_any<'a>(key: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    prefixes.iter().find_map(|p| key.strip_prefix(p))
}

impl LoraAdapter {
    /// Reads a `.safetensors` adapter in any of the formats above.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoraError> {
        let file = path.as_ref().to_path_buf();
        let checkpoint = Checkpoint::open(&file)?;
        let peft = PeftMetadata::read(&checkpoint);
        // By the name's canonical spelling (the dot format writes `to.q.lora.down.weight` beside
        // `to_q.alpha`), with the spelling of its weights kept for messages.
        let mut parts: BTreeMap<String, (String, BTreeMap<Part, String>)> = BTreeMap::new();
        let mut ignored = Vec::new();
        let mut unrecognised = Vec::new();
        for (key, _) in checkpoint.entries() {
            if strip_any(key, TEXT_ENCODER_PREFIXES).is_some() {
                ignored.push(format!("{key} (text encoder)"));
                continue;
            }
            let name = without_adapter_name(strip_any(key, MODEL_PREFIXES).unwrap_or(key));
            if let Some((_, what)) = UNSUPPORTED_SUFFIXES.iter().find(|(s, _)| name.ends_with(s)) {
                return Err(LoraError::Unsupported {
                    file,
                    key: key.to_string(),
                    what: what.to_string(),
                });
            }
            if let Some((_, what)) = IGNORED_SUFFIXES.iter().find(|(s, _)| name.ends_with(s)) {
                ignored.push(format!("{key} ({what})"));
                continue;
            }
            match SUFFIXES.iter().find(|(s, _)| name.ends_with(s)) {
                Some((suffix, part)) => {
                    let module = &name[..name.len() - suffix.len()];
                    let entry = parts
                        .entry(crate::canonical(module))
                        .or_insert_with(|| (module.to_string(), BTreeMap::new()));
                    if *part != Part::Alpha {
                        entry.0 = module.to_string();
                    }
                    entry.1.insert(*part, key.to_string());
                }
                None => unrecognised.push(key.to_string()),
            }
        }
        // Alphas of modules that have no weights are left over from conversions (the dot
        // format's fused duplicates): nothing to apply.
        parts.retain(|_, (module, p)| {
            let lone_alpha = p.keys().all(|&k| k == Part::Alpha);
            if lone_alpha {
                ignored.push(format!("{module}.alpha (an alpha without weights)"));
            }
            !lone_alpha
        });
        if parts.is_empty() {
            let mut keys: Vec<String> = checkpoint.entries().map(|(k, _)| k.to_string()).collect();
            keys.truncate(8);
            return Err(LoraError::NotALora { file, keys });
        }
        ignored.extend(
            unrecognised
                .into_iter()
                .map(|k| format!("{k} (not an adapter tensor)")),
        );
        let reader = Reader {
            file: &file,
            checkpoint: &checkpoint,
        };
        let modules = parts
            .into_values()
            .map(|(name, p)| {
                let alpha = match p.get(&Part::Alpha) {
                    Some(key) => Some(reader.scalar(key)?),
                    None => peft.alpha(&name),
                };
                let kind = reader.kind(&name, &p)?;
                Ok(AdapterModule {
                    name,
                    kind,
                    alpha,
                    rank_stabilized: peft.use_rslora,
                })
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        Ok(Self {
            file,
            modules,
            ignored,
        })
    }

    /// An adapter made in memory (`file` names it in messages).
    pub fn new(file: PathBuf, modules: Vec<AdapterModule>) -> Self {
        Self {
            file,
            modules,
            ignored: Vec::new(),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn modules(&self) -> &[AdapterModule] {
        &self.modules
    }

    /// Tensors recognised but not applied (text-encoder modules, DoRA magnitudes, biases,
    /// unknown tensors), each with why.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }
}

struct Reader<'a> {
    file: &'a Path,
    checkpoint: &'a Checkpoint,
}

impl Reader<'_> {
    fn values(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>), LoraError> {
        let data = self.checkpoint.read(key, None, DType::F32)?;
        let shape = data.shape.to_vec();
        let values = data.to_vec::<f32>().map_err(|e| LoraError::BadShape {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            shape: shape.clone(),
            expected: format!("its values could not be read ({e:?})"),
        })?;
        Ok((values, shape))
    }

    fn scalar(&self, key: &str) -> Result<f32, LoraError> {
        let (values, shape) = self.values(key)?;
        match values.as_slice() {
            [alpha] => Ok(*alpha),
            _ => Err(self.bad(key, shape, "an alpha is one number")),
        }
    }

    fn matrix(&self, key: &str) -> Result<Matrix, LoraError> {
        let (values, shape) = self.values(key)?;
        // A linear layer's adapter; 1x1 convolution shapes `[o, i, 1, 1]` are the same values.
        let (rows, cols) = match shape.as_slice() {
            [r, c] => (*r, *c),
            [r, c, 1, 1] => (*r, *c),
            _ => return Err(self.bad(key, shape, "a matrix [rows, cols] was expected")),
        };
        Ok(Matrix { rows, cols, values })
    }

    fn bad(&self, key: &str, shape: Vec<usize>, expected: &str) -> LoraError {
        LoraError::BadShape {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            shape,
            expected: expected.to_string(),
        }
    }

    fn kind(&self, module: &str, p: &BTreeMap<Part, String>) -> Result<AdapterKind, LoraError> {
        let get = |part: Part| p.get(&part).map(|k| self.matrix(k)).transpose();
        let incomplete = |missing: &str| LoraError::Incomplete {
            file: self.file.to_path_buf(),
            module: module.to_string(),
            has: p.values().cloned().collect(),
            missing: missing.to_string(),
        };
        if p.contains_key(&Part::Down) || p.contains_key(&Part::Up) {
            let down = get(Part::Down)?.ok_or_else(|| incomplete("its lora_A/lora_down"))?;
            let up = get(Part::Up)?.ok_or_else(|| incomplete("its lora_B/lora_up"))?;
            if up.cols != down.rows {
                return Err(self.bad(
                    &p[&Part::Up],
                    vec![up.rows, up.cols],
                    &format!("its rank ({}) is not lora_A's ({})", up.cols, down.rows),
                ));
            }
            return Ok(AdapterKind::LoRA { down, up });
        }
        let factor = |full: Part, pa: Part, pb: Part, name: &str| -> Result<Factor, LoraError> {
            match (get(full)?, get(pa)?, get(pb)?) {
                (Some(m), None, None) => Ok(Factor::Full(m)),
                (None, Some(a), Some(b)) if a.cols == b.rows => Ok(Factor::Product(a, b)),
                (None, Some(a), Some(b)) => Err(self.bad(
                    &p[&pb],
                    vec![b.rows, b.cols],
                    &format!("its rank is not {name}_a's ({})", a.cols),
                )),
                _ => Err(incomplete(&format!(
                    "a whole {name} or both {name}_a and {name}_b"
                ))),
            }
        };
        if p.keys().any(|k| (Part::LokrW1..=Part::LokrW2B).contains(k)) {
            let w1 = factor(Part::LokrW1, Part::LokrW1A, Part::LokrW1B, "lokr_w1")?;
            let w2 = factor(Part::LokrW2, Part::LokrW2A, Part::LokrW2B, "lokr_w2")?;
            return Ok(AdapterKind::LoKr { w1, w2 });
        }
        if p.keys()
            .any(|k| (Part::HadaW1A..=Part::HadaW2B).contains(k))
        {
            let pair = |a: Part, b: Part, name: &str| -> Result<(Matrix, Matrix), LoraError> {
                let (a, b) = (
                    get(a)?.ok_or_else(|| incomplete(&format!("{name}_a")))?,
                    get(b)?.ok_or_else(|| incomplete(&format!("{name}_b")))?,
                );
                if a.cols != b.rows {
                    return Err(incomplete(&format!("{name}_a and {name}_b of one rank")));
                }
                Ok((a, b))
            };
            let w1 = pair(Part::HadaW1A, Part::HadaW1B, "hada_w1")?;
            let w2 = pair(Part::HadaW2A, Part::HadaW2B, "hada_w2")?;
            if [w1.0.rows, w1.1.cols] != [w2.0.rows, w2.1.cols] {
                return Err(incomplete("hada_w1 and hada_w2 of one shape"));
            }
            return Ok(AdapterKind::LoHa { w1, w2 });
        }
        match get(Part::Diff)? {
            Some(m) => Ok(AdapterKind::Diff(m)),
            None => Err(incomplete("its weights")),
        }
    }
}

/// PEFT's adapter config, which diffusers' `save_lora_weights` puts in the header
/// (`lora_adapter_metadata`): where the file has no `.alpha` tensors, alphas come from it.
#[derive(Debug, Default)]
struct PeftMetadata {
    lora_alpha: Option<f32>,
    alpha_pattern: Vec<(String, f32)>,
    use_rslora: bool,
}

impl PeftMetadata {
    fn read(checkpoint: &Checkpoint) -> Self {
        let Some(text) = checkpoint.metadata("lora_adapter_metadata") else {
            return Self::default();
        };
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) else {
            return Self::default();
        };
        let get = |key: &str| {
            map.get(&format!("transformer.{key}"))
                .or_else(|| map.get(key))
        };
        let lora_alpha = get("lora_alpha").and_then(|v| v.as_f64()).map(|a| a as f32);
        let alpha_pattern = get("alpha_pattern")
            .and_then(|v| v.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            lora_alpha,
            alpha_pattern,
            use_rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        }
    }

    /// The alpha of `module`: its `alpha_pattern` entry (by name or name suffix), else `lora_alpha`.
    fn alpha(&self, module: &str) -> Option<f32> {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
    }
}
