//! `cargo xtask convert`: re-writes a model's weights in one dtype as a folder the pipeline
//! loads directly (the Hugging Face layout, diffusers names), with a `manifest.json`.
//!
//! Sources are model folders, Hub repos (through `zimage-hub`) or single safetensors files
//! (ComfyUI / original transformer, ComfyUI Qwen3 text encoder, BFL `ae.safetensors`). Single
//! files carry no configs, so a base folder or repo supplies the configs, the tokenizer and the
//! weights of any component not given as a file.
//!
//! Tensors stream one at a time from the memory-mapped source to the output file: memory holds
//! at most one tensor in its source and output dtypes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::backend::NdArray;
use serde_json::Value;
use zimage_hub::{resolve_model_with, Component, HubOptions};
use zimage_nn::weights::expected_tensors;
use zimage_nn::{Checkpoint, KeyMapping};
use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};
use zimage_vae::checkpoint::{self as vae_checkpoint, ProjectionLayout};
use zimage_vae::{AutoencoderKL, AutoencoderKLConfig};

use crate::writer::{write_file, write_sharded, FileRecord, OutDtype, OutTensor};

/// What `convert` is asked to do.
pub struct ConvertArgs {
    pub from: Vec<String>,
    pub base: Option<String>,
    pub out: PathBuf,
    pub dtype: OutDtype,
    /// Write GGUF files of this ggml type instead of a safetensors folder.
    pub gguf: Option<zimage_nn::quant::GgmlType>,
    pub max_shard_bytes: u64,
    pub force: bool,
}

/// One output tensor and where its values come from.
pub(crate) struct Planned {
    pub(crate) out: OutTensor,
    pub(crate) source: String,
    pub(crate) rows: Option<Range<usize>>,
}

/// A component's weights to convert.
pub(crate) struct ComponentSource {
    pub(crate) component: Component,
    /// What `checkpoint` was opened from (a file or a component folder), to re-open it.
    pub(crate) path: PathBuf,
    pub(crate) checkpoint: Checkpoint,
}

/// Bytes read (counted in the output dtype) between two re-mappings of the source (see
/// [`StreamingReader`]); an f32 -> bf16 conversion thus keeps at most ~2 GiB of source resident.
const REMAP_BYTES: usize = 1 << 30;

/// Reads tensors in turn, re-mapping the source every [`REMAP_BYTES`] read: pages of a mapped file
/// that were read stay in the process's resident set until it is unmapped, so without this
/// converting a 25 GB checkpoint shows ~19 GB resident (reclaimable, but alarming and counted
/// by cgroup limits). Re-opening only re-parses the headers.
pub(crate) struct StreamingReader<'a> {
    path: &'a Path,
    checkpoint: Option<Checkpoint>,
    since_remap: usize,
}

impl<'a> StreamingReader<'a> {
    pub(crate) fn new(path: &'a Path) -> Self {
        Self {
            path,
            checkpoint: None,
            since_remap: 0,
        }
    }

    pub(crate) fn read(
        &mut self,
        name: &str,
        rows: Option<Range<usize>>,
        dtype: burn::tensor::DType,
    ) -> Result<burn::tensor::TensorData> {
        if self.since_remap >= REMAP_BYTES {
            self.checkpoint = None;
            self.since_remap = 0;
        }
        let checkpoint = match &mut self.checkpoint {
            Some(checkpoint) => checkpoint,
            slot => slot.insert(Checkpoint::open(self.path)?),
        };
        let data = checkpoint.read(name, rows, dtype)?;
        self.since_remap += data.as_bytes().len();
        Ok(data)
    }
}

/// Files copied verbatim from the base folder (besides each component's non-weight files).
const TOP_LEVEL: [&str; 3] = ["model_index.json", "scheduler", "tokenizer"];

pub fn convert(args: &ConvertArgs) -> Result<Vec<FileRecord>> {
    let started = Instant::now();
    prepare_out(&args.out, args.force)?;

    // Single files first: they decide which weights the base must supply.
    let mut sources: Vec<ComponentSource> = Vec::new();
    let mut folders: Vec<&str> = Vec::new();
    for from in &args.from {
        let path = Path::new(from);
        if path.is_file() {
            let checkpoint = Checkpoint::open(path)?;
            let component = classify(&checkpoint).ok_or_else(|| {
                anyhow!("{from}: not a Z-Image transformer, Qwen3 text encoder or VAE checkpoint")
            })?;
            if sources.iter().any(|s| s.component == component) {
                bail!("two files give the {} weights", component.folder());
            }
            eprintln!("{from}: {} weights", component.folder());
            sources.push(ComponentSource {
                component,
                path: path.to_path_buf(),
                checkpoint,
            });
        } else {
            folders.push(from);
        }
    }
    let base_spec = match (folders.as_slice(), &args.base) {
        ([], None) => None,
        ([one], None) => Some(one.to_string()),
        ([], Some(base)) => Some(base.clone()),
        _ => bail!("give one folder or repo (as --from or --base), the rest as single files"),
    };
    let missing: Vec<Component> = Component::ALL
        .into_iter()
        .filter(|c| !sources.iter().any(|s| s.component == *c))
        .collect();
    let base = match &base_spec {
        Some(spec) => match resolve_model_with(spec, &HubOptions::from_env(), &missing)
            .with_context(|| format!("resolving {spec}"))?
        {
            zimage_hub::Resolved::Folder(folder) => Some(folder),
            zimage_hub::Resolved::SingleFiles(_) => bail!(
                "{spec} is in ComfyUI's layout (single files, no configs): give its files with \
                 --from and a diffusers folder or repo as --base"
            ),
        },
        None if sources.is_empty() => bail!("nothing to convert: give --from"),
        // GGUF files carry their hyperparameters in their metadata and no tokenizer: without a
        // base, the published configs describe the files.
        None if args.gguf.is_some() => None,
        None => bail!(
            "single files carry no configs or tokenizer: give --base with a model folder or repo \
             (e.g. --base {})",
            zimage_hub::DEFAULT_MODEL
        ),
    };
    // The base supplies the weights of components not given as files.
    if let Some(base) = &base {
        if same_folder(base, &args.out) {
            bail!(
                "--out must differ from the source folder {}",
                base.display()
            );
        }
        for component in &missing {
            let folder = base.join(component.folder());
            if has_safetensors(&folder) {
                sources.push(ComponentSource {
                    component: *component,
                    checkpoint: Checkpoint::open(&folder)?,
                    path: folder,
                });
            } else {
                eprintln!(
                    "warning: no {} weights in {} or the given files; the output will lack them",
                    component.folder(),
                    base.display()
                );
            }
        }
    }

    if let Some(ty) = args.gguf {
        return crate::gguf_out::write(&sources, base.as_deref(), &args.out, ty, started);
    }
    let base = base.expect("only GGUF output goes without a base");
    let mut records = copy_configs(&base, &args.out, args.dtype)?;
    sources.sort_by_key(|s| Component::ALL.iter().position(|c| *c == s.component));
    for source in &sources {
        let plan = plan_component(source, Some(&base))?;
        let component = source.component;
        eprintln!(
            "{}: {} tensors from {} -> {:?}",
            component.folder(),
            plan.len(),
            source.checkpoint.origin().display(),
            args.dtype
        );
        let outs: Vec<OutTensor> = plan.iter().map(|p| p.out.clone()).collect();
        let dtype = args.dtype.burn();
        let mut reader = StreamingReader::new(&source.path);
        records.extend(write_sharded(
            &args.out,
            component.folder(),
            component.weights_stem(),
            &outs,
            args.dtype,
            args.max_shard_bytes,
            |i, w| {
                let p = &plan[i];
                // Casting rounds to nearest even (half's from_f32), as torch does.
                let data = reader.read(&p.source, p.rows.clone(), dtype)?;
                w.write_all(data.as_bytes())?;
                Ok(())
            },
        )?);
    }
    write_manifest(&args.out, args.dtype, &mut records)?;
    eprintln!(
        "wrote {} files to {} in {:.1} s",
        records.len(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(records)
}

/// Which component a single file holds, from its tensor names.
fn classify(checkpoint: &Checkpoint) -> Option<Component> {
    let names: Vec<&str> = checkpoint.entries().map(|(n, _)| n).collect();
    let has = |pred: &dyn Fn(&str) -> bool| names.iter().any(|n| pred(n));
    // The single-file detection key of the transformer (spec §1.2).
    if has(&|n| {
        n.strip_prefix("model.diffusion_model.").unwrap_or(n)
            == "layers.0.adaLN_modulation.0.weight"
    }) {
        return Some(Component::Transformer);
    }
    if has(&|n| {
        let n = n.strip_prefix("model.").unwrap_or(n);
        n == "embed_tokens.weight" || n.starts_with("layers.0.self_attn.")
    }) {
        return Some(Component::TextEncoder);
    }
    vae_checkpoint::detect(checkpoint)
        .is_ok()
        .then_some(Component::Vae)
}

/// A component's `config.json` in the base folder, if it has one (else the published config).
pub(crate) fn config_file(base: Option<&Path>, component: Component) -> Option<PathBuf> {
    base.map(|b| b.join(component.folder()).join("config.json"))
        .filter(|p| p.is_file())
}

/// Output names and shapes of one component, checked against the model where the name mapping
/// is not a plain rename.
pub(crate) fn plan_component(
    source: &ComponentSource,
    base: Option<&Path>,
) -> Result<Vec<Planned>> {
    let ck = &source.checkpoint;
    let mut plan = Vec::new();
    let mut push = |out: String, shape: Vec<usize>, name: &str, rows: Option<Range<usize>>| {
        plan.push(Planned {
            out: OutTensor { name: out, shape },
            source: name.to_string(),
            rows,
        })
    };
    match source.component {
        Component::Transformer => {
            let config = match config_file(base, Component::Transformer) {
                Some(path) => ZImageTransformerConfig::from_file(&path)?,
                None => ZImageTransformerConfig::z_image_turbo(),
            };
            for (name, entry) in ck.entries() {
                match zimage_transformer::checkpoint::map_key(&config, name, &entry.shape) {
                    KeyMapping::To(out) => push(out, entry.shape.clone(), name, None),
                    KeyMapping::Split(parts) => {
                        for (out, rows) in parts {
                            let mut shape = entry.shape.clone();
                            shape[0] = rows.len();
                            push(out, shape, name, Some(rows));
                        }
                    }
                    KeyMapping::Ignore => {}
                }
            }
            let device = Default::default();
            let expected = expected_tensors::<NdArray, _>(&device, |w| {
                ZImageTransformer2DModel::build(&config, w)
            })?;
            check_against_model("transformer", &plan, &expected)?;
        }
        Component::TextEncoder => {
            for (name, entry) in ck.entries() {
                // Tied embeddings: the encoder never reads an LM head, and the published
                // folder has none.
                if name == "lm_head.weight" {
                    continue;
                }
                // Output in the published Qwen3ForCausalLM naming.
                let out = if name.starts_with("model.") {
                    name.to_string()
                } else {
                    format!("model.{name}")
                };
                push(out, entry.shape.clone(), name, None);
            }
        }
        Component::Vae => {
            let config = match config_file(base, Component::Vae) {
                Some(path) => AutoencoderKLConfig::from_file(&path)?,
                None => AutoencoderKLConfig::z_image(),
            };
            let format = vae_checkpoint::detect(ck)?;
            for (name, entry) in ck.entries() {
                let KeyMapping::To(out) =
                    vae_checkpoint::map_key(&format, &config, name, &entry.shape)
                else {
                    continue;
                };
                let mut shape = entry.shape.clone();
                // BFL stores the attention projections as 1x1 convs; diffusers as Linear. The
                // bytes are the same, only the shape changes.
                if format.attention == ProjectionLayout::Conv1x1
                    && is_vae_projection(&out)
                    && shape.len() == 4
                {
                    shape.truncate(2);
                }
                push(out, shape, name, None);
            }
            let device = Default::default();
            let expected =
                expected_tensors::<NdArray, _>(&device, |w| AutoencoderKL::build(&config, w))?;
            check_against_model("vae", &plan, &expected)?;
        }
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = plan.iter().find(|p| !seen.insert(p.out.name.as_str())) {
        bail!(
            "{}: two tensors map to {}",
            ck.origin().display(),
            dup.out.name
        );
    }
    Ok(plan)
}

fn is_vae_projection(name: &str) -> bool {
    [
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
    ]
    .iter()
    .any(|s| name.ends_with(&format!("mid_block.attentions.0.{s}")))
}

/// Every tensor the model asks for is planned with its shape, and nothing else is.
fn check_against_model(
    what: &str,
    plan: &[Planned],
    expected: &[(String, Vec<usize>)],
) -> Result<()> {
    let planned: BTreeMap<&str, &Vec<usize>> = plan
        .iter()
        .map(|p| (p.out.name.as_str(), &p.out.shape))
        .collect();
    let wanted: BTreeMap<&str, &Vec<usize>> =
        expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut problems = Vec::new();
    for (name, shape) in &wanted {
        match planned.get(name) {
            None => problems.push(format!("missing {name}")),
            Some(actual) if actual != shape => problems.push(format!(
                "{name} has shape {actual:?}, the model needs {shape:?}"
            )),
            Some(_) => {}
        }
    }
    for name in planned.keys().filter(|n| !wanted.contains_key(*n)) {
        problems.push(format!("unexpected {name}"));
    }
    if !problems.is_empty() {
        let total = problems.len();
        problems.truncate(12);
        bail!(
            "the {what} weights do not fit the model ({total} problems): {}",
            problems.join("; ")
        );
    }
    Ok(())
}

/// Copies `model_index.json`, `scheduler/`, `tokenizer/` and each component's non-weight files
/// (`config.json`, `generation_config.json`, ...). The text encoder's (transformers) config
/// gets `torch_dtype` set to the output dtype, as `save_pretrained` would write it.
fn copy_configs(base: &Path, out: &Path, dtype: OutDtype) -> Result<Vec<FileRecord>> {
    let mut files: Vec<String> = Vec::new();
    for entry in TOP_LEVEL {
        let path = base.join(entry);
        if path.is_file() {
            files.push(entry.to_string());
        } else if path.is_dir() {
            files.extend(
                list_files(&path)?
                    .into_iter()
                    .map(|f| format!("{entry}/{f}")),
            );
        }
    }
    for component in Component::ALL {
        let dir = base.join(component.folder());
        if dir.is_dir() {
            for f in list_files(&dir)? {
                if !f.ends_with(".safetensors") && !f.ends_with(".safetensors.index.json") {
                    files.push(format!("{}/{f}", component.folder()));
                }
            }
        }
    }
    let mut records = Vec::new();
    for rel in files {
        let source = base.join(&rel);
        let mut bytes =
            fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
        if rel == "text_encoder/config.json" {
            bytes = set_torch_dtype(&bytes, dtype).unwrap_or(bytes);
        }
        records.push(write_file(out, &rel, |w| Ok(w.write_all(&bytes)?))?);
    }
    Ok(records)
}

fn set_torch_dtype(bytes: &[u8], dtype: OutDtype) -> Option<Vec<u8>> {
    let mut config: Value = serde_json::from_slice(bytes).ok()?;
    let object = config.as_object_mut()?;
    object.insert("torch_dtype".into(), Value::String(dtype.torch().into()));
    serde_json::to_vec_pretty(&config).ok()
}

/// Plain files directly in `dir` (cache snapshots hold symlinks: they are followed).
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn has_safetensors(dir: &Path) -> bool {
    list_files(dir).is_ok_and(|files| files.iter().any(|f| f.ends_with(".safetensors")))
}

fn prepare_out(out: &Path, force: bool) -> Result<()> {
    if out.is_dir() && fs::read_dir(out)?.next().is_some() && !force {
        bail!(
            "{} is not empty (use --force to write into it)",
            out.display()
        );
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `manifest.json`: every file with size and sha256, sorted by path.
pub fn write_manifest(out: &Path, dtype: OutDtype, records: &mut Vec<FileRecord>) -> Result<()> {
    records.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = serde_json::json!({
        "dtype": dtype.torch(),
        "generator": concat!("zimage-rs xtask ", env!("CARGO_PKG_VERSION")),
        "files": records,
    });
    let text = serde_json::to_string_pretty(&manifest)?;
    write_file(out, "manifest.json", |w| Ok(w.write_all(text.as_bytes())?))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use burn::tensor::DType;
    use half::bf16;
    use safetensors::{serialize_to_file, Dtype as StDtype, View};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::writer::hex;

    fn repo_root() -> PathBuf {
        // At run time, as zimage-test-support does: the binary may come from another checkout.
        let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo test");
        Path::new(&manifest).join("..")
    }

    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy_tree(&path, &target);
            } else {
                fs::copy(&path, &target).unwrap();
            }
        }
    }

    /// The tiny pipeline fixture with the tiny text encoder and the tokenizer beside it.
    fn tiny_model(dir: &Path) {
        let fixtures = repo_root().join("tests/fixtures");
        copy_tree(&fixtures.join("pipeline/tiny"), dir);
        copy_tree(
            &fixtures.join("text/a/text_encoder"),
            &dir.join("text_encoder"),
        );
        copy_tree(&fixtures.join("text/tokenizer"), &dir.join("tokenizer"));
        fs::write(
            dir.join("tokenizer/tokenizer.json"),
            zimage_text::qwen3_tokenizer_json().unwrap(),
        )
        .unwrap();
    }

    struct Raw(Vec<usize>, Vec<u8>);

    impl View for &Raw {
        fn dtype(&self) -> StDtype {
            StDtype::F32
        }
        fn shape(&self) -> &[usize] {
            &self.0
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.1)
        }
        fn data_len(&self) -> usize {
            self.1.len()
        }
    }

    fn f32_values(ck: &Checkpoint, name: &str) -> Vec<f32> {
        ck.read(name, None, DType::F32).unwrap().to_vec().unwrap()
    }

    fn args(
        from: Vec<String>,
        base: Option<String>,
        out: &Path,
        dtype: OutDtype,
        shard: u64,
    ) -> ConvertArgs {
        ConvertArgs {
            from,
            base,
            out: out.to_path_buf(),
            dtype,
            gguf: None,
            max_shard_bytes: shard,
            force: false,
        }
    }

    #[test]
    fn a_folder_converts_to_bf16_shards_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("src"), dir.path().join("out"));
        tiny_model(&src);
        let records = convert(&args(
            vec![src.to_string_lossy().into_owned()],
            None,
            &out,
            OutDtype::Bf16,
            400_000,
        ))
        .unwrap();

        // Several transformer shards with an index, every value rounded to nearest even.
        let index = out.join("transformer/diffusion_pytorch_model.safetensors.index.json");
        assert!(index.is_file());
        let (before, after) = (
            Checkpoint::open(src.join("transformer")).unwrap(),
            Checkpoint::open(out.join("transformer")).unwrap(),
        );
        assert_eq!(before.len(), after.len());
        for (name, entry) in after.entries() {
            assert_eq!(entry.dtype, zimage_nn::StoredDtype::BF16, "{name}");
            let expected: Vec<bf16> = f32_values(&before, name)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let actual: Vec<bf16> = after
                .read(name, None, DType::BF16)
                .unwrap()
                .to_vec()
                .unwrap();
            assert_eq!(actual, expected, "{name}");
        }
        // The components load as the pipeline loads them.
        let device = Default::default();
        ZImageTransformer2DModel::<NdArray>::from_folder(
            out.join("transformer"),
            &device,
            DType::F32,
        )
        .unwrap();
        AutoencoderKL::<NdArray>::from_folder(out.join("vae"), &device, DType::F32).unwrap();
        let text = Checkpoint::open(out.join("text_encoder")).unwrap();
        assert_eq!(
            text.len(),
            Checkpoint::open(src.join("text_encoder")).unwrap().len()
        );

        // Configs and tokenizer copied; text encoder config says its new dtype.
        for rel in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/tokenizer_config.json",
            "vae/config.json",
        ] {
            assert_eq!(
                fs::read(out.join(rel)).unwrap(),
                fs::read(src.join(rel)).unwrap(),
                "{rel}"
            );
        }
        let config: Value =
            serde_json::from_slice(&fs::read(out.join("text_encoder/config.json")).unwrap())
                .unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");

        // The manifest lists every file but itself, with true sizes and hashes.
        let manifest: Value =
            serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
        let files = manifest["files"].as_array().unwrap();
        assert_eq!(files.len(), records.len());
        let mut on_disk = Vec::new();
        collect(&out, &out, &mut on_disk);
        on_disk.retain(|p| p != "manifest.json");
        let listed: Vec<String> = files
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, on_disk);
        for f in files {
            let bytes = fs::read(out.join(f["path"].as_str().unwrap())).unwrap();
            assert_eq!(f["size"], bytes.len() as u64);
            assert_eq!(f["sha256"], hex(&Sha256::digest(&bytes)));
        }

        // A second run refuses to overwrite.
        let err = convert(&args(
            vec![src.to_string_lossy().into_owned()],
            None,
            &out,
            OutDtype::F16,
            400_000,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                collect(root, &path, out);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
        out.sort();
    }

    /// The tiny transformer in the original/ComfyUI naming: prefixed, fused qkv, `out`,
    /// `q_norm`/`k_norm`, `final_layer`/`x_embedder`, and the unused `norm_final.weight`.
    fn write_comfy_transformer(config: &ZImageTransformerConfig, src: &Checkpoint, path: &Path) {
        let mut tensors: Vec<(String, Raw)> = Vec::new();
        let raw = |name: &str| {
            let entry = src.get(name).unwrap();
            Raw(
                entry.shape.clone(),
                bytemuck::cast_slice(&f32_values(src, name)).to_vec(),
            )
        };
        for (name, _) in src.entries() {
            let Some(original) = zimage_transformer::checkpoint::original_name(config, name) else {
                continue;
            };
            if let Some(block) = name.strip_suffix(".attention.to_q.weight") {
                let parts: Vec<Raw> = ["to_q", "to_k", "to_v"]
                    .iter()
                    .map(|p| raw(&format!("{block}.attention.{p}.weight")))
                    .collect();
                let rows: usize = parts.iter().map(|p| p.0[0]).sum();
                let bytes = parts.iter().flat_map(|p| p.1.clone()).collect();
                tensors.push((original, Raw(vec![rows, parts[0].0[1]], bytes)));
                continue;
            }
            tensors.push((original, raw(name)));
        }
        tensors.push(("norm_final.weight".into(), Raw(vec![2], vec![0; 8])));
        let named = tensors
            .iter()
            .map(|(n, r)| (format!("model.diffusion_model.{n}"), r));
        serialize_to_file(named, None, path).unwrap();
    }

    #[test]
    fn single_files_use_diffusers_names_and_the_base_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (base, out) = (dir.path().join("base"), dir.path().join("out"));
        tiny_model(&base);
        let reference = Checkpoint::open(base.join("transformer")).unwrap();
        let comfy = dir.path().join("z_image_turbo.safetensors");
        let config =
            ZImageTransformerConfig::from_file(base.join("transformer/config.json")).unwrap();
        write_comfy_transformer(&config, &reference, &comfy);

        // A text encoder without the `model.` prefix and with an LM head.
        let text_src = Checkpoint::open(base.join("text_encoder")).unwrap();
        let mut text: Vec<(String, Raw)> = text_src
            .entries()
            .map(|(n, e)| {
                (
                    n.strip_prefix("model.").unwrap().to_string(),
                    Raw(
                        e.shape.clone(),
                        bytemuck::cast_slice(&f32_values(&text_src, n)).to_vec(),
                    ),
                )
            })
            .collect();
        text.push(("lm_head.weight".into(), Raw(vec![1, 2], vec![0; 8])));
        let qwen = dir.path().join("qwen_3_4b.safetensors");
        serialize_to_file(text.iter().map(|(n, r)| (n.clone(), r)), None, &qwen).unwrap();

        convert(&args(
            vec![
                comfy.to_string_lossy().into_owned(),
                qwen.to_string_lossy().into_owned(),
            ],
            Some(base.to_string_lossy().into_owned()),
            &out,
            OutDtype::F32,
            5_000_000_000,
        ))
        .unwrap();

        // The transformer comes back with the diffusers names and the exact values.
        let converted = Checkpoint::open(out.join("transformer")).unwrap();
        assert!(out
            .join("transformer/diffusion_pytorch_model.safetensors")
            .is_file());
        let names = |ck: &Checkpoint| ck.entries().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&converted), names(&reference));
        for name in names(&reference) {
            assert_eq!(
                f32_values(&converted, &name),
                f32_values(&reference, &name),
                "{name}"
            );
        }
        // Text encoder: published naming, no LM head, values exact (bf16 -> f32).
        let text_out = Checkpoint::open(out.join("text_encoder")).unwrap();
        assert_eq!(names(&text_out), names(&text_src));
        // VAE from the base.
        assert!(out
            .join("vae/diffusion_pytorch_model.safetensors")
            .is_file());

        // Files without a base are refused with a hint.
        let err = convert(&args(
            vec![comfy.to_string_lossy().into_owned()],
            None,
            &dir.path().join("o2"),
            OutDtype::F32,
            1 << 30,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("--base"), "{err}");
    }

    /// diffusers VAE name -> BFL `ae.safetensors` name (the inverse of the vae crate's mapping,
    /// checked against it below).
    fn bfl_name(name: &str, num_blocks: usize) -> String {
        let p: Vec<&str> = name.split('.').collect();
        let rest = |k: usize| p[k..].join(".");
        let shortcut = |l: &str| {
            if l == "conv_shortcut" {
                "nin_shortcut".to_string()
            } else {
                l.to_string()
            }
        };
        match p.as_slice() {
            [side, "conv_norm_out", ..] => format!("{side}.norm_out.{}", rest(2)),
            ["encoder", "down_blocks", i, "resnets", j, l, ..] => {
                format!("encoder.down.{i}.block.{j}.{}.{}", shortcut(l), rest(6))
            }
            ["encoder", "down_blocks", i, "downsamplers", "0", ..] => {
                format!("encoder.down.{i}.downsample.{}", rest(5))
            }
            ["decoder", "up_blocks", b, "resnets", j, l, ..] => {
                let b = num_blocks - 1 - b.parse::<usize>().unwrap();
                format!("decoder.up.{b}.block.{j}.{}.{}", shortcut(l), rest(6))
            }
            ["decoder", "up_blocks", b, "upsamplers", "0", ..] => {
                let b = num_blocks - 1 - b.parse::<usize>().unwrap();
                format!("decoder.up.{b}.upsample.{}", rest(5))
            }
            [side, "mid_block", "resnets", k, l, ..] => {
                format!(
                    "{side}.mid.block_{}.{}.{}",
                    k.parse::<usize>().unwrap() + 1,
                    shortcut(l),
                    rest(5)
                )
            }
            [side, "mid_block", "attentions", "0", l, ..] => {
                let (layer, skip) = match *l {
                    "group_norm" => ("norm", 5),
                    "to_q" => ("q", 5),
                    "to_k" => ("k", 5),
                    "to_v" => ("v", 5),
                    _ => ("proj_out", 6), // to_out.0
                };
                format!("{side}.mid.attn_1.{layer}.{}", rest(skip))
            }
            _ => name.to_string(),
        }
    }

    /// GGUF output needs no base for the published models (their configs are built in); a
    /// model of another size given without its folder is refused before anything is written
    /// (its `qwen3.*` metadata would describe Qwen3-4B), and with the folder it converts, the
    /// metadata describing it.
    #[test]
    fn gguf_output_takes_its_metadata_from_a_config_that_fits() {
        let dir = tempfile::tempdir().unwrap();
        let (base, out) = (dir.path().join("base"), dir.path().join("out"));
        tiny_model(&base);
        let file = base.join("text_encoder/model.safetensors");
        let mut gguf = args(
            vec![file.to_string_lossy().into_owned()],
            None,
            &out,
            OutDtype::F32,
            5_000_000_000,
        );
        gguf.gguf = Some(zimage_nn::quant::GgmlType::Q8_0);

        let error = convert(&gguf).unwrap_err().to_string();
        assert!(
            error.contains("not the model of its config")
                && error.contains("3 layers, the config says 36")
                && error.contains("is [1000, 64], the config says [151936, 2560]"),
            "{error}"
        );
        assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "nothing written");

        gguf.base = Some(base.to_string_lossy().into_owned());
        convert(&gguf).unwrap();
        let written = Checkpoint::open(out.join("qwen3-Q8_0.gguf")).unwrap();
        let config = zimage_text::Qwen3Config::from_gguf(&written)
            .unwrap()
            .unwrap();
        let tiny =
            zimage_text::Qwen3Config::from_file(base.join("text_encoder/config.json")).unwrap();
        assert_eq!(
            (
                config.hidden_size,
                config.num_hidden_layers,
                config.vocab_size
            ),
            (tiny.hidden_size, tiny.num_hidden_layers, tiny.vocab_size)
        );
    }

    #[test]
    fn a_bfl_vae_file_becomes_a_diffusers_vae() {
        let dir = tempfile::tempdir().unwrap();
        let (base, out) = (dir.path().join("base"), dir.path().join("out"));
        tiny_model(&base);
        let reference = Checkpoint::open(base.join("vae")).unwrap();
        let config = AutoencoderKLConfig::from_file(base.join("vae/config.json")).unwrap();
        let bfl_format = vae_checkpoint::CheckpointFormat {
            naming: vae_checkpoint::Naming::Bfl,
            prefix: String::new(),
            attention: ProjectionLayout::Conv1x1,
        };
        let tensors: Vec<(String, Raw)> = reference
            .entries()
            .map(|(name, entry)| {
                let bfl = bfl_name(name, config.num_blocks());
                assert_eq!(
                    vae_checkpoint::diffusers_name(&bfl_format, config.num_blocks(), &bfl)
                        .as_deref(),
                    Some(name),
                    "{bfl}"
                );
                let mut shape = entry.shape.clone();
                if is_vae_projection(name) {
                    shape.extend([1, 1]);
                }
                (
                    bfl,
                    Raw(
                        shape,
                        bytemuck::cast_slice(&f32_values(&reference, name)).to_vec(),
                    ),
                )
            })
            .collect();
        let ae = dir.path().join("ae.safetensors");
        serialize_to_file(tensors.iter().map(|(n, r)| (n.clone(), r)), None, &ae).unwrap();

        convert(&args(
            vec![ae.to_string_lossy().into_owned()],
            Some(base.to_string_lossy().into_owned()),
            &out,
            OutDtype::F32,
            5_000_000_000,
        ))
        .unwrap();
        let converted = Checkpoint::open(out.join("vae")).unwrap();
        assert_eq!(converted.len(), reference.len());
        for (name, entry) in reference.entries() {
            assert_eq!(converted.get(name).unwrap().shape, entry.shape, "{name}");
            assert_eq!(
                f32_values(&converted, name),
                f32_values(&reference, name),
                "{name}"
            );
        }
    }
}
