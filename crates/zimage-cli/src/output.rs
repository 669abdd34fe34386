//! Writing images: PNG with the generation parameters in an iTXt chunk, or JPEG; atomically
//! (a temporary file renamed into place, so a failure never leaves a partial image).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("jpg" | "jpeg") => Ok(Format::Jpeg),
            _ => bail!(
                "--output {} must end in .png, .jpg or .jpeg",
                path.display()
            ),
        }
    }
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
pub fn paths(output: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    (0..count)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Encodes `image` and moves it to `path` only once it is complete.
pub fn save(image: &RgbImage, path: &Path, parameters: &str) -> Result<()> {
    let bytes = match Format::of(path)? {
        Format::Png => png_bytes(image, parameters)?,
        Format::Jpeg => {
            let mut bytes = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
                .encode_image(image)
                .context("encoding JPEG")?;
            bytes
        }
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!(
            "cannot write {}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn png_bytes(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    zimage_pipeline::record::png_with_parameters(image, parameters).context("encoding PNG")
}
