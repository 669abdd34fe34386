//! Downloads from a fake Hub on 127.0.0.1 into a temporary cache: layout, no-op second run,
//! offline use, resume, corruption, missing repos and tokens. Nothing here touches the real
//! network or the real ~/.cache.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use zimage_hub::{
    resolve_model, resolve_model_with, Component, HubError, HubOptions, HubRepo, RepoSpec, Resolved,
};
use zimage_test_support::fake_hub::{sha256_hex, FakeHub, Faults, COMMIT};

const REPO: &str = "test-org/tiny-zimage";
const SHARD: &str = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors";

/// The tiny pipeline fixture plus a small sharded text encoder, a tokenizer, and files the
/// pipeline does not need (which must not be downloaded).
fn tiny_repo() -> BTreeMap<String, Vec<u8>> {
    // Read at run time: a test binary reused from another checkout (shared target dir) must
    // still find this checkout's fixtures.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo test");
    let fixture = Path::new(&manifest).join("../../tests/fixtures/pipeline/tiny");
    let mut files = BTreeMap::new();
    add_tree(&fixture, &fixture, &mut files);
    assert!(files.contains_key(SHARD), "fixture lacks {SHARD}");
    files.insert(
        "text_encoder/config.json".into(),
        br#"{"model_type": "qwen3", "num_hidden_layers": 2}"#.to_vec(),
    );
    files.insert(
        "text_encoder/model.safetensors.index.json".into(),
        br#"{"metadata": {"total_size": 24}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors"}}"#
            .to_vec(),
    );
    // The hub never parses weights: any bytes do.
    files.insert(
        "text_encoder/model-00001-of-00002.safetensors".into(),
        (0..5000u32).flat_map(|i| i.to_le_bytes()).collect(),
    );
    files.insert(
        "text_encoder/model-00002-of-00002.safetensors".into(),
        b"second shard".to_vec(),
    );
    files.insert(
        "tokenizer/tokenizer.json".into(),
        br#"{"model": {"type": "BPE"}}"#.to_vec(),
    );
    files.insert(
        "tokenizer/tokenizer_config.json".into(),
        br#"{"model_max_length": 512}"#.to_vec(),
    );
    files.insert("README.md".into(), b"not needed".to_vec());
    files.insert("text_encoder/generation_config.json".into(), b"{}".to_vec());
    files
}

fn add_tree(root: &Path, dir: &Path, files: &mut BTreeMap<String, Vec<u8>>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            add_tree(root, &path, files);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            files.insert(rel, fs::read(&path).unwrap());
        }
    }
}

fn options(cache: &Path, hub: &FakeHub) -> HubOptions {
    let mut options = HubOptions::new(cache, hub.url.clone()).quiet();
    options.retries = 0;
    options
}

fn snapshot_dir(cache: &Path) -> PathBuf {
    cache
        .join("models--test-org--tiny-zimage/snapshots")
        .join(COMMIT)
}

/// Every file the pipeline needs, with the bytes the repo holds.
fn needed(files: &BTreeMap<String, Vec<u8>>) -> Vec<(&String, &Vec<u8>)> {
    files
        .iter()
        .filter(|(path, _)| *path != "README.md" && !path.ends_with("generation_config.json"))
        .collect()
}

fn folder_of(resolved: Resolved) -> PathBuf {
    match resolved {
        Resolved::Folder(folder) => folder,
        other => panic!("expected a diffusers layout folder, got {other:?}"),
    }
}

fn gets(hub: &FakeHub) -> Vec<zimage_test_support::fake_hub::Seen> {
    hub.seen()
        .into_iter()
        .filter(|s| s.method == "GET")
        .collect()
}

#[test]
fn downloads_into_the_huggingface_cache_layout_once() {
    let hub = FakeHub::start();
    let files = tiny_repo();
    hub.add_repo(REPO, files.clone());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &hub);

    let folder = folder_of(resolve_model(REPO, &opts).unwrap());
    assert_eq!(folder, snapshot_dir(cache.path()));
    let repo_dir = cache.path().join("models--test-org--tiny-zimage");
    assert_eq!(
        fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    for (path, bytes) in needed(&files) {
        let file = folder.join(path);
        assert_eq!(&fs::read(&file).unwrap(), bytes, "{path}");
        // Snapshot entries are relative links into blobs/, named by sha256 for LFS files.
        #[cfg(unix)]
        {
            let target = fs::read_link(&file).unwrap();
            assert!(target.is_relative(), "{path}: {target:?}");
            let blob = target.file_name().unwrap().to_string_lossy().into_owned();
            if path.ends_with(".safetensors") {
                assert_eq!(blob, sha256_hex(bytes), "{path}");
            } else {
                assert_eq!(blob.len(), 40, "{path}");
            }
            assert!(repo_dir.join("blobs").join(&blob).is_file());
        }
    }
    assert!(!folder.join("README.md").exists());
    assert!(!folder.join("text_encoder/generation_config.json").exists());
    let leftovers: Vec<_> = fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Blob downloads went to the CDN; the resolve URLs were only asked for metadata or small
    // files.
    assert!(gets(&hub).iter().any(|s| s.path.starts_with("/cdn/")));

    // Second run: one HEAD to learn the commit, nothing downloaded.
    hub.clear_seen();
    assert_eq!(folder_of(resolve_model(REPO, &opts).unwrap()), folder);
    let seen = hub.seen();
    assert!(gets(&hub).is_empty(), "{seen:?}");
    assert_eq!(seen.len(), 1, "{seen:?}");

    // A commit id needs no request at all.
    hub.clear_seen();
    let pinned = format!("{REPO}@{COMMIT}");
    assert_eq!(folder_of(resolve_model(&pinned, &opts).unwrap()), folder);
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
}

#[test]
fn offline_mode_uses_the_cache_and_says_what_is_missing() {
    let hub = FakeHub::start();
    hub.add_repo(REPO, tiny_repo());
    let cache = tempfile::tempdir().unwrap();

    // Nothing cached yet.
    let mut offline = HubOptions::new(cache.path(), "http://127.0.0.1:9").quiet();
    offline.offline = true;
    let err = resolve_model(REPO, &offline).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");

    let folder = folder_of(resolve_model(REPO, &options(cache.path(), &hub)).unwrap());
    // Offline (and pointed at a port nobody listens on): resolved through refs/main.
    assert_eq!(folder_of(resolve_model(REPO, &offline).unwrap()), folder);
    let repo = HubRepo::new(RepoSpec::parse(REPO).unwrap(), offline.clone());
    assert_eq!(
        repo.download_file("vae/config.json").unwrap(),
        folder.join("vae/config.json")
    );

    // A shard gone from the snapshot is named.
    fs::remove_file(folder.join(SHARD)).unwrap();
    let err = resolve_model(REPO, &offline).unwrap_err();
    assert!(err.to_string().contains(SHARD), "{err}");
    // Configs only do not need it.
    folder_of(resolve_model_with(REPO, &offline, &[Component::Vae]).unwrap());

    // Online but unreachable: a complete cached snapshot is used, an incomplete one is not.
    let unreachable = HubOptions::new(cache.path(), "http://127.0.0.1:9").quiet();
    let err = resolve_model(REPO, &unreachable).unwrap_err();
    assert!(matches!(err, HubError::Network { .. }), "{err}");
    assert_eq!(
        folder_of(resolve_model_with(REPO, &unreachable, &[Component::Vae]).unwrap()),
        folder
    );
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let hub = FakeHub::start();
    let files = tiny_repo();
    let size = files[SHARD].len();
    hub.add_repo(REPO, files.clone());
    let cache = tempfile::tempdir().unwrap();
    let cut = 100_000;
    hub.set_faults(Faults {
        disconnect: Some((SHARD.into(), cut, 1)),
        ..Default::default()
    });

    // No retries: the error names the file and the partial download is kept.
    let err = resolve_model(REPO, &options(cache.path(), &hub)).unwrap_err();
    match &err {
        HubError::Interrupted {
            file,
            received,
            expected,
            ..
        } => {
            assert_eq!(file, SHARD);
            assert_eq!(*received, cut as u64);
            assert_eq!(*expected, size as u64);
        }
        other => panic!("expected Interrupted, got {other}"),
    }
    let incomplete = cache
        .path()
        .join("models--test-org--tiny-zimage/blobs")
        .join(format!("{}.incomplete", sha256_hex(&files[SHARD])));
    assert_eq!(fs::metadata(&incomplete).unwrap().len(), cut as u64);
    assert!(!snapshot_dir(cache.path()).join(SHARD).exists());

    // The next run continues from byte `cut`.
    hub.clear_seen();
    let folder = folder_of(resolve_model(REPO, &options(cache.path(), &hub)).unwrap());
    assert_eq!(fs::read(folder.join(SHARD)).unwrap(), files[SHARD]);
    let shard_gets: Vec<_> = gets(&hub)
        .into_iter()
        .filter(|s| s.path.ends_with(SHARD) && s.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(shard_gets.len(), 1, "{shard_gets:?}");
    assert_eq!(
        shard_gets[0].range.as_deref(),
        Some(&*format!("bytes={cut}-"))
    );
    assert!(!incomplete.exists());
}

#[test]
fn retries_resume_within_one_call() {
    let hub = FakeHub::start();
    let files = tiny_repo();
    hub.add_repo(REPO, files.clone());
    hub.set_faults(Faults {
        disconnect: Some((SHARD.into(), 70_000, 2)),
        ..Default::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path(), &hub);
    opts.retries = 3;
    let folder = folder_of(resolve_model(REPO, &opts).unwrap());
    assert_eq!(fs::read(folder.join(SHARD)).unwrap(), files[SHARD]);
    let ranges: Vec<_> = gets(&hub)
        .into_iter()
        .filter(|s| s.path.ends_with(SHARD) && s.path.starts_with("/cdn/"))
        .map(|s| s.range)
        .collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some("bytes=70000-".to_string()),
            Some("bytes=140000-".to_string())
        ]
    );
}

#[test]
fn a_corrupt_download_is_reported_and_deleted() {
    let hub = FakeHub::start();
    let files = tiny_repo();
    hub.add_repo(REPO, files.clone());
    hub.set_faults(Faults {
        corrupt: Some(SHARD.into()),
        ..Default::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model(REPO, &options(cache.path(), &hub)).unwrap_err();
    match &err {
        HubError::HashMismatch { file, expected, .. } => {
            assert_eq!(file, SHARD);
            assert_eq!(expected, &sha256_hex(&files[SHARD]));
        }
        other => panic!("expected HashMismatch, got {other}"),
    }
    assert!(err.to_string().contains(SHARD));
    assert!(!snapshot_dir(cache.path()).join(SHARD).exists());
    let blobs = cache.path().join("models--test-org--tiny-zimage/blobs");
    let sha = sha256_hex(&files[SHARD]);
    assert!(!blobs.join(&sha).exists());
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());

    // Fixed server: the next run succeeds.
    hub.set_faults(Faults::default());
    let folder = folder_of(resolve_model(REPO, &options(cache.path(), &hub)).unwrap());
    assert_eq!(fs::read(folder.join(SHARD)).unwrap(), files[SHARD]);
}

#[test]
fn missing_repos_revisions_and_files_are_typed_errors() {
    let hub = FakeHub::start();
    hub.add_repo(REPO, tiny_repo());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &hub);

    let err = resolve_model("test-org/no-such-model", &opts).unwrap_err();
    assert!(
        matches!(&err, HubError::NotFound { what, .. } if what == "repo"),
        "{err}"
    );
    let err = resolve_model(&format!("{REPO}@v9"), &opts).unwrap_err();
    assert!(
        matches!(&err, HubError::NotFound { what, .. } if what == "revision"),
        "{err}"
    );

    let repo = HubRepo::new(RepoSpec::parse(REPO).unwrap(), opts.clone());
    let err = repo.download_file("vae/missing.json").unwrap_err();
    assert!(err.to_string().contains("vae/missing.json"), "{err}");
    assert!(err.is_not_found());

    // A repo without the optional tokenizer_config.json still resolves.
    let mut files = tiny_repo();
    files.remove("tokenizer/tokenizer_config.json");
    hub.add_repo("test-org/no-tokenizer-config", files);
    folder_of(resolve_model("test-org/no-tokenizer-config", &opts).unwrap());

    // Not a path and not a repo id.
    let err = resolve_model("/no/such/folder", &opts).unwrap_err();
    assert!(matches!(err, HubError::InvalidSpec { .. }), "{err}");
    // An existing path is used as it is, without any request.
    hub.clear_seen();
    assert_eq!(
        folder_of(resolve_model(&cache.path().to_string_lossy(), &opts).unwrap()),
        cache.path()
    );
    assert!(hub.seen().is_empty());
}

#[test]
fn private_repos_need_a_token_that_only_the_hub_sees() {
    let hub = FakeHub::start();
    hub.add_repo(REPO, tiny_repo());
    hub.set_faults(Faults {
        token: Some("hf_secret".into()),
        ..Default::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path(), &hub);
    let err = resolve_model(REPO, &opts).unwrap_err();
    assert!(
        matches!(err, HubError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    opts.token = Some("hf_secret".into());
    folder_of(resolve_model(REPO, &opts).unwrap());
    for seen in hub
        .seen()
        .iter()
        .filter(|s| s.method == "GET" || s.method == "HEAD")
    {
        if seen.path.starts_with("/cdn/") {
            assert_eq!(seen.authorization, None, "token leaked to {}", seen.path);
        }
    }
}

#[test]
fn single_files_and_partial_weight_sets() {
    let hub = FakeHub::start();
    let files = tiny_repo();
    hub.add_repo(REPO, files.clone());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &hub);

    let repo = HubRepo::new(RepoSpec::parse(REPO).unwrap(), opts.clone());
    let path = repo.download_file("README.md").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"not needed");

    let folder = folder_of(resolve_model_with(REPO, &opts, &[Component::Vae]).unwrap());
    assert!(folder
        .join("vae/diffusion_pytorch_model.safetensors")
        .is_file());
    assert!(folder.join("transformer/config.json").is_file());
    assert!(!folder.join(SHARD).exists());
}

/// A repo in ComfyUI's layout (no model_index.json): the three single files, bf16 preferred
/// over fp8 and f32, nothing else downloaded; the second run and offline mode use the cache.
#[test]
fn comfyui_layout_downloads_only_the_three_files() {
    const COMFY: &str = "Comfy-Org/z_image_turbo";
    let hub = FakeHub::start();
    let file = |tag: &str| tag.as_bytes().repeat(100);
    let mut files = BTreeMap::new();
    for (path, bytes) in [
        (
            "split_files/diffusion_models/z_image_turbo_bf16.safetensors",
            file("dit bf16"),
        ),
        (
            "split_files/diffusion_models/z_image_turbo_fp8_e4m3fn.safetensors",
            file("dit fp8"),
        ),
        (
            "split_files/diffusion_models/z_image_turbo.safetensors",
            file("dit f32"),
        ),
        (
            "split_files/text_encoders/qwen_3_4b.safetensors",
            file("qwen3"),
        ),
        (
            "split_files/text_encoders/qwen_3_4b_fp8_mixed.safetensors",
            file("qwen3 fp8"),
        ),
        ("split_files/vae/ae.safetensors", file("vae")),
        ("README.md", file("readme")),
    ] {
        files.insert(path.to_string(), bytes);
    }
    hub.add_repo(COMFY, files.clone());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &hub);

    let Resolved::SingleFiles(found) = resolve_model(COMFY, &opts).unwrap() else {
        panic!("a ComfyUI repo resolves to single files");
    };
    let by_component: BTreeMap<String, Vec<u8>> = found
        .iter()
        .map(|(c, path)| (format!("{c:?}"), fs::read(path).unwrap()))
        .collect();
    assert_eq!(by_component["Transformer"], file("dit bf16"));
    assert_eq!(by_component["TextEncoder"], file("qwen3"));
    assert_eq!(by_component["Vae"], file("vae"));
    let downloaded: Vec<String> = gets(&hub)
        .into_iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .map(|s| s.path)
        .collect();
    assert_eq!(downloaded.len(), 3, "{downloaded:?}");

    // Only what is asked for: a transformer given as a file leaves two downloads.
    let partial = resolve_model_with(COMFY, &opts, &[Component::Vae]).unwrap();
    assert!(
        matches!(&partial, Resolved::SingleFiles(f) if f.len() == 1 && f[0].0 == Component::Vae)
    );

    // Again: nothing downloaded; offline: the cache alone.
    hub.clear_seen();
    assert_eq!(
        resolve_model(COMFY, &opts).unwrap(),
        Resolved::SingleFiles(found.clone())
    );
    assert!(gets(&hub).iter().all(|s| !s.path.starts_with("/cdn/")));
    let mut offline = opts.clone();
    offline.offline = true;
    hub.clear_seen();
    assert_eq!(
        resolve_model(COMFY, &offline).unwrap(),
        Resolved::SingleFiles(found.clone())
    );
    assert!(hub.seen().is_empty());

    // The snapshot folder, given as a path, is read the same way.
    let snapshot = cache
        .path()
        .join("models--Comfy-Org--z_image_turbo/snapshots")
        .join(COMMIT);
    let local = resolve_model(&snapshot.to_string_lossy(), &opts).unwrap();
    let Resolved::SingleFiles(local) = local else {
        panic!("a local ComfyUI folder resolves to single files");
    };
    assert_eq!(local.len(), 3);

    // A repo with neither layout says what a Z-Image repo holds.
    hub.add_repo(
        "test-org/empty",
        BTreeMap::from([("README.md".to_string(), file("x"))]),
    );
    let err = resolve_model("test-org/empty", &opts).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("split_files"), "{err}");
}
