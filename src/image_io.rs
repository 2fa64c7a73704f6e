//! Pixels in and out: image files <-> normalised tensors, and PNG files with text metadata,
//! written atomically (a temporary file renamed into place) so no half-written image is left.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};

/// Read an image file (PNG or JPEG) as RGB.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let img_err = |message: String| Error::Image { path: path.to_path_buf(), message };
    if !path.exists() {
        return Err(img_err("no such file".into()));
    }
    let reader = image::ImageReader::open(path)
        .map_err(|e| img_err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| img_err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(img_err("not a PNG or JPEG image".into()));
    }
    let img = reader.decode().map_err(|e| img_err(format!("cannot decode: {e}")))?;
    Ok(img.to_rgb8())
}

/// RGB image -> `(1, 3, H, W)` in [-1, 1] (x/255 - 0.5) / 0.5, Emu3's preprocessing.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data = Tensor::from_vec(img.as_raw().clone(), (h as usize, w as usize, 3), device)?;
    let t = data.permute((2, 0, 1))?.to_dtype(DType::F32)?;
    Ok(((t / 127.5)? - 1.0)?.unsqueeze(0)?)
}

/// `(3, H, W)` decoder output -> RGB image: x*0.5+0.5, *255, clamp, truncate (transformers'
/// postprocess).
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        return Err(Error::Invalid(format!("expected 3 channels, got {c}")));
    }
    let t = ((t.to_dtype(DType::F32)? * 127.5)? + 127.5)?.clamp(0f32, 255f32)?;
    let hwc = t.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = hwc.into_iter().map(|v| v as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| Error::Invalid("image buffer size".into()))
}

/// Resize to exactly `w` x `h` (Catmull-Rom, close to PIL's bicubic).
pub fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    image::imageops::resize(img, w, h, image::imageops::FilterType::CatmullRom)
}

/// Peak signal-to-noise ratio of two same-sized images, in dB.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum::<f64>()
        / a.as_raw().len().max(1) as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

/// Write `img` as PNG with `tEXt`/`iTXt` chunks, via a temporary file renamed into place.
pub fn save_png(path: &Path, img: &RgbImage, text: &[(&str, &str)]) -> Result<()> {
    let tmp = temp_path(path);
    let write = || -> std::result::Result<(), String> {
        let mut buf = Vec::new();
        let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            if v.is_ascii() {
                enc.add_text_chunk(k.to_string(), v.to_string()).map_err(|e| e.to_string())?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.to_string()).map_err(|e| e.to_string())?;
            }
        }
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(img.as_raw()).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        std::fs::write(&tmp, &buf).map_err(|e| e.to_string())
    };
    if let Err(message) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Image { path: path.to_path_buf(), message });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// The text chunks of a PNG file (`tEXt` and `iTXt`), in file order.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let img_err = |message: String| Error::Image { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| img_err(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for c in &info.utf8_text {
        if let Ok(t) = c.get_text() {
            out.push((c.keyword.clone(), t));
        }
    }
    Ok(out)
}

/// `dir/.name.tmp-PID` beside the target, so the final rename stays on one file system.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
