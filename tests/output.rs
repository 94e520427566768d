//! The output stage: PNG frames, the mp4 through each encoder path, RGB -> YUV, the outputs tree,
//! atomicity under a kill, and write errors.
//!
//! The mp4 checks read files back with ffprobe/ffmpeg. Without them these tests print a note and
//! skip the read-back, unless CELFRAME_REQUIRE_FFMPEG=1 (CI sets it), which makes a missing ffmpeg
//! a failure.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use celframe::output::{
    ClipOptions, Fps, GridCell, Mp4Choice, Mp4Encoder, OutputTree, PngPool, RgbImage, decode_png, encode_png,
    rgb_to_yuv420, write_png,
};
use common::TempDir;

// ---------------------------------------------------------------------------------------------
// Synthetic frames

/// Frame `t` of a test clip (t < 64): smooth colour gradients, the blue one drifting with t, and a
/// 24x24 square of a saturated colour moving across them.
fn frame(w: u32, h: u32, t: u32) -> RgbImage {
    let (w, h) = (w as usize, h as usize);
    let mut px = vec![0u8; w * h * 3];
    let side = 24usize.min(w).min(h);
    let sx = (t as usize * 7) % (w - side + 1);
    let sy = (t as usize * 3) % (h - side + 1);
    for y in 0..h {
        for x in 0..w {
            let p = &mut px[(y * w + x) * 3..(y * w + x) * 3 + 3];
            if (sx..sx + side).contains(&x) && (sy..sy + side).contains(&y) {
                p.copy_from_slice(&[230, 40, 60]);
            } else {
                p[0] = (x * 255 / (w - 1)) as u8;
                p[1] = (y * 255 / (h - 1)) as u8;
                p[2] = ((x + y + 4 * t as usize) * 255 / (w + h + 4 * 64)) as u8;
            }
        }
    }
    RgbImage::new(w as u32, h as u32, px).unwrap()
}

/// Pseudo-random pixels (incompressible: PNG files about as large as the raw frame).
fn noise(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let px = (0..w as usize * h as usize * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8
        })
        .collect();
    RgbImage::new(w, h, px).unwrap()
}

// ---------------------------------------------------------------------------------------------
// ffmpeg / ffprobe helpers

fn ffmpeg_tools() -> bool {
    let runs = |p: &str| Command::new(p).arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    let found = runs("ffmpeg") && runs("ffprobe");
    if !found {
        assert!(
            std::env::var("CELFRAME_REQUIRE_FFMPEG").as_deref() != Ok("1"),
            "CELFRAME_REQUIRE_FFMPEG=1 but ffmpeg/ffprobe are not on PATH"
        );
        eprintln!("note: ffmpeg/ffprobe not on PATH: mp4 read-back checks skipped");
    }
    found
}

/// ffprobe's view of the first video stream (frames counted by decoding).
fn probe(mp4: &Path) -> BTreeMap<String, String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries"])
        .arg(
            "stream=codec_name,profile,pix_fmt,width,height,r_frame_rate,avg_frame_rate,nb_read_frames,\
             color_space,color_primaries,color_transfer,color_range",
        )
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(mp4)
        .output()
        .unwrap();
    assert!(out.status.success(), "ffprobe {}: {}", mp4.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Decodes every frame to RGB with ffmpeg, converting with the BT.709 limited-range matrix
/// explicitly (so a wrong matrix on the encoding side shows as error, not as a tag mismatch).
fn decode_rgb(mp4: &Path) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(mp4)
        .args(["-vf", "scale=in_color_matrix=bt709:in_range=tv:flags=accurate_rnd+full_chroma_int,format=rgb24"])
        .args(["-f", "rawvideo", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ffmpeg decode: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Top-level box types of an ISO BMFF file, in order.
fn top_level_boxes(path: &Path) -> Vec<String> {
    boxes(&std::fs::read(path).unwrap()).into_iter().map(|(kind, _)| kind).collect()
}

/// The top-level boxes of an mp4 file: type and payload range.
fn boxes(bytes: &[u8]) -> Vec<(String, std::ops::Range<usize>)> {
    let mut at = 0usize;
    let mut found = Vec::new();
    while at + 8 <= bytes.len() {
        let size32 = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
        let kind = String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned();
        let (size, header) = match size32 {
            1 => (u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap()), 16),
            0 => ((bytes.len() - at) as u64, 8),
            s => (s, 8),
        };
        assert!(size >= header && at as u64 + size <= bytes.len() as u64, "box {kind} at {at}: size {size}");
        found.push((kind, at + header as usize..at + size as usize));
        at += size as usize;
    }
    assert_eq!(at, bytes.len(), "trailing bytes after the last box");
    found
}

/// The first macroblock of every slice in an mp4's `mdat` (4-byte-length-prefixed NAL units, ISO/IEC
/// 14496-15), one list per picture: a picture's first slice starts at macroblock 0.
fn slice_starts(mp4: &Path) -> Vec<Vec<u32>> {
    let bytes = std::fs::read(mp4).unwrap();
    let (_, mdat) = boxes(&bytes).into_iter().find(|(kind, _)| kind == "mdat").expect("an mdat box");
    let data = &bytes[mdat];
    let mut pictures: Vec<Vec<u32>> = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let unit = &data[at + 4..at + 4 + len];
        at += 4 + len;
        if ![1, 5].contains(&(unit[0] & 0x1f)) {
            continue; // not a coded slice (ITU-T H.264 Table 7-1)
        }
        // first_mb_in_slice, the slice header's first field: ue(v), Exp-Golomb (H.264 9.1).
        let bit = |i: usize| (unit[1 + i / 8] >> (7 - i % 8)) & 1;
        let zeros = (0..).take_while(|&i| bit(i) == 0).count();
        let suffix = (0..zeros).fold(0u32, |v, i| (v << 1) | bit(zeros + 1 + i) as u32);
        let first_mb = (1u32 << zeros) - 1 + suffix;
        if first_mb == 0 {
            pictures.push(Vec::new());
        }
        pictures.last_mut().expect("a picture starts at macroblock 0").push(first_mb);
    }
    assert_eq!(at, data.len(), "mdat ends inside a NAL unit");
    pictures
}

/// Mean absolute error over all bytes.
fn mean_abs_error(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
}

/// Checks one clip's mp4 with ffprobe and by decoding it against the source frames.
fn check_mp4(mp4: &Path, frames: &[RgbImage], fps: &str, max_mae: f64) -> f64 {
    let (w, h) = (frames[0].width(), frames[0].height());
    let p = probe(mp4);
    let expect = [
        ("codec_name", "h264".to_string()),
        ("pix_fmt", "yuv420p".to_string()),
        ("width", w.to_string()),
        ("height", h.to_string()),
        ("r_frame_rate", fps.to_string()),
        ("avg_frame_rate", fps.to_string()),
        ("nb_read_frames", frames.len().to_string()),
        ("color_space", "bt709".to_string()),
        ("color_primaries", "bt709".to_string()),
        ("color_transfer", "bt709".to_string()),
        ("color_range", "tv".to_string()),
    ];
    for (key, value) in expect {
        assert_eq!(p.get(key), Some(&value), "{}: ffprobe {key} (all: {p:?})", mp4.display());
    }
    // faststart: the movie header comes before the media data.
    let boxes = top_level_boxes(mp4);
    let (moov, mdat) = (boxes.iter().position(|b| b == "moov"), boxes.iter().position(|b| b == "mdat"));
    assert!(moov.is_some() && mdat.is_some() && moov < mdat, "{}: top-level boxes {boxes:?}", mp4.display());

    // The container's colour box (ISO/IEC 14496-12 colr, type nclx): primaries, transfer and
    // matrix 1 (BT.709, ITU-T H.273), full_range_flag 0.
    let bytes = std::fs::read(mp4).unwrap();
    let at =
        bytes.windows(8).position(|w| w == b"colrnclx").unwrap_or_else(|| panic!("{}: no colr nclx", mp4.display()));
    assert_eq!(&bytes[at + 8..at + 15], &[0, 1, 0, 1, 0, 1, 0], "{}: colr nclx fields", mp4.display());

    let decoded = decode_rgb(mp4);
    let source: Vec<u8> = frames.iter().flat_map(|f| f.pixels().iter().copied()).collect();
    assert_eq!(decoded.len(), source.len(), "decoded bytes");
    let mae = mean_abs_error(&decoded, &source);
    assert!(mae <= max_mae, "{}: mean abs error {mae:.3} > {max_mae}", mp4.display());
    mae
}

/// Every file under `dir`, relative, sorted (folders end in '/').
fn tree_listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &e.path(), out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn options(w: u32, h: u32, fps: u32, mp4: Mp4Choice) -> ClipOptions {
    let mut o = ClipOptions::new(w, h, Fps::whole(fps).unwrap());
    o.mp4 = mp4;
    o.png_threads = 2;
    o.queue_frames = 4;
    o
}

fn write_clip(tree: &OutputTree, index: u32, opts: &ClipOptions, frames: &[RgbImage]) -> celframe::output::ClipReport {
    let mut clip = tree.begin_clip(index, opts).unwrap();
    for f in frames {
        clip.push(f.clone()).unwrap();
    }
    clip.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// RGB -> Y'CbCr (BT.709, limited range)

/// The BT.709 equations in f64, from the Recommendation's constants (not from the code under
/// test): D'Y = 219 E'Y + 16, D'C = 224 E'C + 128, E' = D / 255.
fn bt709_f64(r: u8, g: u8, b: u8) -> (f64, f64, f64) {
    let (r, g, b) = (r as f64 / 255.0, g as f64 / 255.0, b as f64 / 255.0);
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    (219.0 * y + 16.0, 224.0 * (b - y) / 1.8556 + 128.0, 224.0 * (r - y) / 1.5748 + 128.0)
}

#[test]
fn yuv_bt709_limited_range_known_values() {
    // 100% colour bars in 8-bit BT.709 limited range: (R, G, B) -> (Y, Cb, Cr). These are the
    // Recommendation's equations rounded: e.g. red Y = 16 + 219 * 0.2126 = 62.56 -> 63,
    // Cb = 128 - 224 * 0.2126 / 1.8556 = 102.34 -> 102, Cr = 128 + 112 = 240.
    let bars: [([u8; 3], [u8; 3]); 8] = [
        ([255, 255, 255], [235, 128, 128]),
        ([255, 255, 0], [219, 16, 138]),
        ([0, 255, 255], [188, 154, 16]),
        ([0, 255, 0], [173, 42, 26]),
        ([255, 0, 255], [78, 214, 230]),
        ([255, 0, 0], [63, 102, 240]),
        ([0, 0, 255], [32, 240, 118]),
        ([0, 0, 0], [16, 128, 128]),
    ];
    // Each bar as a flat 2x2 block, side by side: 16x2 pixels.
    let mut px = Vec::new();
    for _row in 0..2 {
        for (rgb, _) in &bars {
            px.extend_from_slice(rgb);
            px.extend_from_slice(rgb);
        }
    }
    let yuv = rgb_to_yuv420(&RgbImage::new(16, 2, px).unwrap()).unwrap();
    assert_eq!((yuv.y.len(), yuv.u.len(), yuv.v.len()), (32, 8, 8));
    for (i, (rgb, [y, cb, cr])) in bars.iter().enumerate() {
        for (row, col) in [(0, 2 * i), (0, 2 * i + 1), (1, 2 * i), (1, 2 * i + 1)] {
            assert_eq!(yuv.y[row * 16 + col], *y, "bar {rgb:?}: Y");
        }
        assert_eq!((yuv.u[i], yuv.v[i]), (*cb, *cr), "bar {rgb:?}: Cb, Cr");
    }
}

#[test]
fn yuv_matches_the_equations_over_the_rgb_cube() {
    // Luma of every pixel, and chroma of flat 2x2 blocks, over a lattice of the RGB cube
    // (every 5th level of each channel plus 255): within 0.5 of the exact value, i.e. correctly
    // rounded (a value exactly on .5 may round either way).
    let levels: Vec<u8> = (0..=255u32).step_by(5).map(|v| v as u8).chain([255]).collect();
    let mut colours: Vec<[u8; 3]> = Vec::new();
    for &r in &levels {
        for &g in &levels {
            for &b in &levels {
                colours.push([r, g, b]);
            }
        }
    }
    // One 2x2 block per colour in a 2-row strip.
    let w = colours.len() * 2;
    let mut px = vec![0u8; w * 2 * 3];
    for (i, c) in colours.iter().enumerate() {
        for (row, col) in [(0, 2 * i), (0, 2 * i + 1), (1, 2 * i), (1, 2 * i + 1)] {
            px[(row * w + col) * 3..(row * w + col) * 3 + 3].copy_from_slice(c);
        }
    }
    let yuv = rgb_to_yuv420(&RgbImage::new(w as u32, 2, px).unwrap()).unwrap();
    let mut worst = 0f64;
    for (i, c) in colours.iter().enumerate() {
        let (y, cb, cr) = bt709_f64(c[0], c[1], c[2]);
        for (got, want, what) in [(yuv.y[2 * i], y, "Y"), (yuv.u[i], cb, "Cb"), (yuv.v[i], cr, "Cr")] {
            let err = (got as f64 - want).abs();
            worst = worst.max(err);
            assert!(err <= 0.5 + 1e-9, "{c:?}: {what} {got}, exact {want:.4}");
        }
    }
    assert!(worst > 0.49, "the lattice should reach rounding error near 0.5 (worst {worst})");

    // Chroma of a mixed block is the chroma of the block's mean colour.
    let block = RgbImage::new(2, 2, vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]).unwrap();
    let yuv = rgb_to_yuv420(&block).unwrap();
    // Mean colour (127.5, 127.5, 127.5): grey, so neutral chroma; each pixel keeps its own luma.
    assert_eq!((yuv.u[0], yuv.v[0]), (128, 128));
    assert_eq!(&yuv.y[..], &[63, 173, 32, 235]);

    let odd = rgb_to_yuv420(&RgbImage::new(3, 2, vec![0; 18]).unwrap()).unwrap_err();
    assert!(odd.to_string().contains("even"), "{odd}");
}

/// ffmpeg's (swscale's) RGB -> BT.709 limited-range yuv420p of `image`, as one I420 buffer.
fn swscale_yuv420(image: &RgbImage) -> Vec<u8> {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-video_size", &format!("{}x{}", image.width(), image.height()), "-i", "-"])
        .args(["-vf", "scale=out_color_matrix=bt709:out_range=tv:flags=accurate_rnd,format=yuv420p"])
        .args(["-f", "rawvideo", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let pixels = image.pixels().to_vec();
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &pixels).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "ffmpeg rgb24 -> yuv420p failed");
    out.stdout
}

#[test]
fn yuv_agrees_with_ffmpeg_swscale() {
    if !ffmpeg_tools() {
        return;
    }
    // Luma on a textured image: within 1 of swscale (its RGB -> Y uses 15-bit fixed point).
    let textured = frame(256, 64, 3);
    let (ours, theirs) = (rgb_to_yuv420(&textured).unwrap(), swscale_yuv420(&textured));
    let max_y = ours.y.iter().zip(&theirs).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(max_y <= 1, "luma differs from swscale by up to {max_y}");

    // Chroma inside flat 32x32 blocks of many colours (swscale filters chroma across block edges;
    // inside a flat block every filter gives the block's value): within 1.
    let (w, h) = (512usize, 64usize);
    let mut px = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let k = ((x / 32) * 7 + (y / 32) * 131) as u32;
            let c = [(k * 37 % 256) as u8, (k * 91 % 256) as u8, (k * 53 % 256) as u8];
            px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
        }
    }
    let blocks = RgbImage::new(w as u32, h as u32, px).unwrap();
    let (ours, theirs) = (rgb_to_yuv420(&blocks).unwrap(), swscale_yuv420(&blocks));
    let (cw, ch) = (w / 2, h / 2);
    let (su, sv) = (&theirs[w * h..w * h + cw * ch], &theirs[w * h + cw * ch..]);
    let mut compared = 0;
    for cy in (0..ch).filter(|c| (4..12).contains(&(c % 16))) {
        for cx in (0..cw).filter(|c| (4..12).contains(&(c % 16))) {
            let i = cy * cw + cx;
            for (a, b, what) in [(ours.u[i], su[i], "Cb"), (ours.v[i], sv[i], "Cr")] {
                assert!((a as i32 - b as i32).abs() <= 1, "{what} at ({cx}, {cy}): ours {a}, swscale {b}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 16 * 2 * 8 * 8);
}

// ---------------------------------------------------------------------------------------------
// PNG

#[test]
fn png_round_trip_is_bit_exact() {
    let dir = TempDir::new("out-png");
    for (i, image) in [frame(64, 48, 0), frame(97, 31, 5), noise(33, 17, 9), frame(1, 1, 0)].iter().enumerate() {
        let path = dir.path(&format!("{i}.png"));
        write_png(&path, image).unwrap();
        let back = decode_png(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((back.width(), back.height()), (image.width(), image.height()));
        assert_eq!(back.pixels(), image.pixels(), "image {i}");
        assert_eq!(encode_png(image).unwrap(), std::fs::read(&path).unwrap(), "image {i}: file vs memory");
    }
    // Only the four files: no temporaries left.
    assert_eq!(dir.entries(), vec!["0.png", "1.png", "2.png", "3.png"]);

    // The pool: many frames from several threads, each decoded back.
    let pool = PngPool::new(3, 2).unwrap();
    let frames: Vec<RgbImage> = (0..12).map(|t| frame(80, 40, t)).collect();
    for (t, f) in frames.iter().enumerate() {
        pool.submit(dir.path(&format!("pool_{t:02}.png")), f.clone()).unwrap();
    }
    assert_eq!(pool.finish().unwrap(), 12);
    for (t, f) in frames.iter().enumerate() {
        let back = decode_png(&std::fs::read(dir.path(&format!("pool_{t:02}.png"))).unwrap()).unwrap();
        assert_eq!(back.pixels(), f.pixels(), "pool frame {t}");
    }
}

#[test]
fn rgb_image_and_fps_refuse_bad_values() {
    assert!(RgbImage::new(4, 4, vec![0; 47]).unwrap_err().to_string().contains("48 bytes"));
    assert!(RgbImage::new(0, 4, vec![]).is_err());
    assert!(Fps::new(0, 1).is_err());
    assert!(Fps::new(10, 0).is_err());
    assert!(Fps::new(241, 1).unwrap_err().to_string().contains("240"));
    let f = Fps::new(20, 2).unwrap();
    assert_eq!((f.num(), f.den(), f.to_string()), (10, 1, "10".to_string()));
    assert_eq!(Fps::new(24000, 1001).unwrap().to_string(), "24000/1001");
}

// ---------------------------------------------------------------------------------------------
// mp4 through each path

/// Writes a 20-frame 256x144 clip at 10 fps through `choice` and checks frames and mp4.
fn clip_through(choice: Mp4Choice, max_mae: f64) -> (Mp4Encoder, f64) {
    let dir = TempDir::new("out-clip");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let frames: Vec<RgbImage> = (0..20).map(|t| frame(256, 144, t)).collect();
    let report = write_clip(&tree, 1, &options(256, 144, 10, choice), &frames);
    assert_eq!((report.frames, report.png_frames), (20, 20));
    let clip = dir.path("outputs/video/clip_001");
    assert_eq!(report.dir, clip);
    let mp4 = clip.join("clip_001.mp4");
    assert_eq!(report.mp4.as_deref(), Some(mp4.as_path()));
    for (t, f) in frames.iter().enumerate() {
        let back = decode_png(&std::fs::read(clip.join(format!("frames/{t:06}.png"))).unwrap()).unwrap();
        assert_eq!(back.pixels(), f.pixels(), "frame {t}");
    }
    let mae = if ffmpeg_tools() { check_mp4(&mp4, &frames, "10/1", max_mae) } else { f64::NAN };
    (report.encoder.unwrap(), mae)
}

#[test]
fn mp4_built_in_encoder() {
    // Tolerance: mean absolute error over all RGB bytes <= 1.5 levels. 4:2:0 alone (convert,
    // decode, no encoding) costs 0.50 on these frames, most of it at the red square's edges; the
    // built-in path (quantiser <= 26) measured 0.93, libx264 at CRF 18 0.84.
    let (encoder, mae) = clip_through(Mp4Choice::BuiltIn, 1.5);
    assert_eq!(encoder, Mp4Encoder::BuiltIn { why: None });
    eprintln!("built-in encoder: mean abs error {mae:.3}");
}

#[test]
fn mp4_built_in_encoder_takes_noise() {
    // Pure noise codes to more bytes than OpenH264's frame buffer holds at low quantisers (it
    // failed on the 8th frame before the encoder learned to restart with a higher cap). Every
    // frame must still be there and decode cleanly.
    let dir = TempDir::new("out-noise");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let mut opts = options(128, 96, 10, Mp4Choice::BuiltIn);
    opts.png_frames = false;
    let frames: Vec<RgbImage> =
        (0..24).map(|t| if t < 16 { noise(128, 96, t as u64) } else { frame(128, 96, t) }).collect();
    let report = write_clip(&tree, 1, &opts, &frames);
    let mp4 = report.mp4.unwrap();
    if !ffmpeg_tools() {
        return;
    }
    assert_eq!(probe(&mp4).get("nb_read_frames").map(String::as_str), Some("24"));
    let out = Command::new("ffmpeg").args(["-v", "error", "-i"]).arg(&mp4).args(["-f", "null", "-"]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // The gradient frames after the noise are still coded well.
    let decoded = decode_rgb(&mp4);
    let n = 128 * 96 * 3;
    let tail: Vec<u8> = frames[16..].iter().flat_map(|f| f.pixels().iter().copied()).collect();
    let mae = mean_abs_error(&decoded[16 * n..], &tail);
    assert!(mae < 3.0, "gradient frames after noise: mean abs error {mae:.3}");
}

/// The 1-based sample numbers in the mp4's `stss` box (its sync samples: the IDR pictures).
fn sync_samples(mp4: &Path) -> Vec<u32> {
    let bytes = std::fs::read(mp4).unwrap();
    let at = bytes.windows(4).position(|w| w == b"stss").expect("an stss box");
    let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    // After the type: version and flags (4 bytes), the entry count, the entries.
    let count = word(at + 8) as usize;
    (0..count).map(|k| word(at + 12 + 4 * k)).collect()
}

/// `frames` through the built-in encoder (no PNGs) once per thread count, as clips 1, 2, ...;
/// asserts every run wrote the first one's bytes and returns that mp4.
fn built_in_mp4_on_any_threads(tree: &OutputTree, frames: &[RgbImage], fps: u32, threads: &[usize]) -> PathBuf {
    let (w, h) = (frames[0].width(), frames[0].height());
    let mut files = Vec::new();
    for (i, &threads) in threads.iter().enumerate() {
        let mut opts = options(w, h, fps, Mp4Choice::BuiltIn);
        opts.png_frames = false;
        opts.mp4_threads = threads;
        let report = write_clip(tree, i as u32 + 1, &opts, frames);
        files.push((threads, report.mp4.unwrap()));
    }
    let first = std::fs::read(&files[0].1).unwrap();
    for (threads, mp4) in &files[1..] {
        assert!(std::fs::read(mp4).unwrap() == first, "{threads} threads wrote other bytes than 1 thread");
    }
    files.swap_remove(0).1
}

#[test]
fn mp4_built_in_gops_in_parallel_give_the_same_bytes() {
    // 64 frames at 10 fps: GOPs from frames 0, 20, 40 and 60, each on its own encoder. Noise in
    // the second GOP overflows OpenH264's frame buffer, so that GOP's encoder restarts with a
    // higher quantiser cap (an extra IDR) while the others keep theirs.
    let dir = TempDir::new("out-gops");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let frames: Vec<RgbImage> =
        (0..64).map(|t| if (22..38).contains(&t) { noise(128, 96, t as u64) } else { frame(128, 96, t) }).collect();
    let mp4 = &built_in_mp4_on_any_threads(&tree, &frames, 10, &[1, 2, 4]);
    let sync = sync_samples(mp4);
    let restarts: Vec<u32> = sync.iter().copied().filter(|s| ![1, 21, 41, 61].contains(s)).collect();
    eprintln!("sync samples {sync:?}");
    assert!(
        [1, 21, 41, 61].iter().all(|s| sync.contains(s))
            && !restarts.is_empty()
            && restarts.iter().all(|s| (23..=38).contains(s)),
        "sync samples {sync:?}: want every GOP's first frame and a restart inside the noise"
    );
    if !ffmpeg_tools() {
        return;
    }
    assert_eq!(probe(mp4).get("nb_read_frames").map(String::as_str), Some("64"));
    let out = Command::new("ffmpeg").args(["-v", "error", "-i"]).arg(mp4).args(["-f", "null", "-"]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // The gradient frames of every GOP decode well: (frames before the noise, after it).
    let decoded = decode_rgb(mp4);
    let n = 128 * 96 * 3;
    for range in [0..22, 38..64] {
        let source: Vec<u8> = frames[range.clone()].iter().flat_map(|f| f.pixels().iter().copied()).collect();
        let mae = mean_abs_error(&decoded[range.start * n..range.end * n], &source);
        eprintln!("frames {range:?}: mean abs error {mae:.3}");
        assert!(mae < 3.0, "frames {range:?}: mean abs error {mae:.3}");
    }
}

#[test]
fn mp4_built_in_slices_give_the_same_bytes_on_any_threads() {
    // 128x512 pictures are 8 x 32 macroblocks, coded as 4 slices of 8 rows (OpenH264 cuts them at
    // pairs of rows). With one thread the encoder codes the slices one after another; with more,
    // GOPs take OpenH264's thread pool and code them at once. Neither may change the bytes, also
    // where noise restarts the encoder (OpenH264's buffers overflow at other sizes on its pool than
    // on one thread): at 20 fps (GOPs of 40 frames from frames 0, 40 and 80), noise in frames 42
    // to 77 codes larger from frame to frame as the rate control lowers the quantiser, until a
    // slice outgrows its share of the raw picture.
    let dir = TempDir::new("out-slices");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let (w, h) = (128, 512);
    let noisy = 42usize..78;
    let frames: Vec<RgbImage> = (0..96usize)
        .map(|t| if noisy.contains(&t) { noise(w, h, t as u64) } else { frame(w, h, t as u32 % 64) })
        .collect();
    let mp4 = &built_in_mp4_on_any_threads(&tree, &frames, 20, &[1, 2, 4, 8]);
    let pictures = slice_starts(mp4);
    assert_eq!(pictures.len(), 96, "pictures");
    assert!(pictures.iter().all(|p| p == &[0, 64, 128, 192]), "slices (first macroblocks): {pictures:?}");
    let sync = sync_samples(mp4);
    eprintln!("sync samples {sync:?}");
    let restarts: Vec<u32> = sync.iter().copied().filter(|s| ![1, 41, 81].contains(s)).collect();
    assert!(
        [1, 41, 81].iter().all(|s| sync.contains(s))
            && !restarts.is_empty()
            && restarts.iter().all(|&s| noisy.contains(&(s as usize - 1))),
        "sync samples {sync:?}: want every GOP's first frame and a restart inside the noise"
    );
    if !ffmpeg_tools() {
        return;
    }
    assert_eq!(probe(mp4).get("nb_read_frames").map(String::as_str), Some("96"));
    let out = Command::new("ffmpeg").args(["-v", "error", "-i"]).arg(mp4).args(["-f", "null", "-"]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // Quality bound: the clean frames within 1.2 levels of mean abs error (measured 0.86 and 0.88
    // with these 4 slices; one slice gave 0.82 and 0.85).
    let decoded = decode_rgb(mp4);
    let n = (w * h * 3) as usize;
    for range in [0..noisy.start, noisy.end..96usize] {
        let source: Vec<u8> = frames[range.clone()].iter().flat_map(|f| f.pixels().iter().copied()).collect();
        let mae = mean_abs_error(&decoded[range.start * n..range.end * n], &source);
        eprintln!("frames {range:?}: mean abs error {mae:.3}");
        assert!(mae < 1.2, "frames {range:?}: mean abs error {mae:.3}");
    }
}

#[test]
fn mp4_ffmpeg_encoder() {
    if !ffmpeg_tools() {
        return;
    }
    // Tolerance as for the built-in path (mp4_built_in_encoder).
    let (encoder, mae) = clip_through(Mp4Choice::Ffmpeg, 1.5);
    assert!(matches!(&encoder, Mp4Encoder::Ffmpeg { version } if version.starts_with("ffmpeg version")), "{encoder}");
    eprintln!("ffmpeg encoder: mean abs error {mae:.3}");
}

#[test]
fn mp4_auto_picks_ffmpeg_or_says_why_not() {
    let dir = TempDir::new("out-auto");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let frames: Vec<RgbImage> = (0..3).map(|t| frame(128, 64, t)).collect();

    // No such program: the built-in encoder, with the reason.
    let mut opts = options(128, 64, 8, Mp4Choice::Auto);
    opts.png_frames = false;
    opts.ffmpeg = dir.path("no-such-ffmpeg");
    let report = write_clip(&tree, 1, &opts, &frames);
    match &report.encoder {
        Some(Mp4Encoder::BuiltIn { why: Some(why) }) => assert!(why.contains("not found"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(tree_listing(&report.dir), vec!["clip_001.mp4"]);
    // Asked for ffmpeg explicitly: an input error naming the reason.
    opts.mp4 = Mp4Choice::Ffmpeg;
    let err = tree.begin_clip(2, &opts).err().unwrap();
    assert!(err.to_string().contains("not found") && err.exit_code() == 2, "{err}");

    if ffmpeg_tools() {
        let mut opts = options(128, 64, 8, Mp4Choice::Auto);
        opts.png_frames = false;
        let report = write_clip(&tree, 3, &opts, &frames);
        assert!(matches!(report.encoder, Some(Mp4Encoder::Ffmpeg { .. })), "{:?}", report.encoder);
        // Small frames: the square's edges weigh more than in mp4_built_in_encoder.
        check_mp4(report.mp4.as_ref().unwrap(), &frames, "8/1", 2.5);
    }
    // Nothing half-done anywhere.
    assert!(tree_listing(&dir.path("outputs/video")).iter().all(|p| !p.contains(".tmp") && !p.starts_with('.')));
}

#[test]
fn mp4_rational_frame_rate() {
    if !ffmpeg_tools() {
        return;
    }
    let dir = TempDir::new("out-ntsc");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let frames: Vec<RgbImage> = (0..6).map(|t| frame(128, 96, t)).collect();
    for (i, choice) in [Mp4Choice::BuiltIn, Mp4Choice::Ffmpeg].into_iter().enumerate() {
        let mut opts = options(128, 96, 1, choice);
        opts.fps = Fps::new(24000, 1001).unwrap();
        opts.png_frames = false;
        let report = write_clip(&tree, i as u32 + 1, &opts, &frames);
        check_mp4(report.mp4.as_ref().unwrap(), &frames, "24000/1001", 2.5);
    }
}

#[test]
fn odd_and_oversized_frames_are_refused() {
    let dir = TempDir::new("out-odd");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    for (w, h) in [(255, 144), (256, 143)] {
        let err = tree.begin_clip(1, &options(w, h, 10, Mp4Choice::Auto)).err().unwrap();
        assert!(err.to_string().contains("even width and height") && err.exit_code() == 2, "{err}");
    }
    // PNG frames only: odd sizes are fine.
    let mut opts = options(255, 143, 10, Mp4Choice::Off);
    opts.png_threads = 1;
    let report = write_clip(&tree, 1, &opts, &[frame(255, 143, 0)]);
    assert_eq!((report.mp4, report.encoder), (None, None));
    // A frame of another size than the clip's.
    let mut clip = tree.begin_clip(2, &options(64, 32, 10, Mp4Choice::BuiltIn)).unwrap();
    let err = clip.push(frame(32, 32, 0)).unwrap_err();
    assert!(err.to_string().contains("32x32") && err.to_string().contains("64x32"), "{err}");
    drop(clip);
    // Beyond OpenH264's limit.
    let err = tree.begin_clip(3, &options(4096, 2304, 10, Mp4Choice::BuiltIn)).err().unwrap();
    assert!(err.to_string().contains("3840x2160") && err.exit_code() == 2, "{err}");
    // No frames at all.
    let clip = tree.begin_clip(4, &options(64, 32, 10, Mp4Choice::BuiltIn)).unwrap();
    assert!(clip.finish().unwrap_err().to_string().contains("no frames"));
    assert_eq!(
        tree_listing(&dir.path("outputs/video")),
        vec!["clip_001/", "clip_001/frames/", "clip_001/frames/000000.png"]
    );
}

// ---------------------------------------------------------------------------------------------
// ffmpeg failures

/// A fake `ffmpeg` shell script: answers `-encoders` like ffmpeg with libx264, and otherwise runs
/// `body` (which may read stdin, print to stderr, exit ...).
fn fake_ffmpeg(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path(name);
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = -encoders ]; then\n  echo 'ffmpeg version fake' >&2\n  \
         echo ' V....D libx264   libx264 H.264'\n  exit 0\nfi\n{body}\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn ffmpeg_failure_is_an_error_with_its_stderr_and_never_hangs() {
    let dir = TempDir::new("out-fail");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let frames: Vec<RgbImage> = (0..40).map(|t| frame(128, 64, t)).collect();
    let cases = [
        // Exits at once without reading: writes hit a broken pipe.
        ("exits", "echo 'fake: Unknown encoder libx264-nope' >&2\nexit 3", "exit status: 3", "Unknown encoder"),
        // Reads everything, then fails at the end (as when the disk fills during the moov pass).
        ("late", "cat >/dev/null\necho 'fake: No space left on device' >&2\nexit 1", "exit status: 1", "No space left"),
        // Floods stderr (1 MB) before reading: no deadlock, and the tail is what is reported.
        (
            "noisy",
            "head -c 1000000 /dev/zero | tr '\\0' 'x' >&2\necho >&2\necho 'fake: the last line' >&2\nexit 2",
            "exit status: 2",
            "the last line",
        ),
        // Killed by a signal.
        ("signal", "kill -9 $$", "signal: 9", "no message"),
    ];
    for (i, (name, body, status, message)) in cases.iter().enumerate() {
        let mut opts = options(128, 64, 10, Mp4Choice::Ffmpeg);
        opts.ffmpeg = fake_ffmpeg(&dir, name, body);
        let started = Instant::now();
        let mut clip = tree.begin_clip(i as u32 + 1, &opts).unwrap();
        let mut result = Ok(());
        for f in &frames {
            result = clip.push(f.clone());
            if result.is_err() {
                break;
            }
        }
        let err = match result {
            Err(e) => e,
            Ok(()) => clip.finish().err().unwrap_or_else(|| panic!("{name}: the failing ffmpeg was not noticed")),
        };
        let text = err.to_string();
        assert!(text.contains(status) && text.contains(message), "{name}: {text}");
        assert!(text.len() < 4500, "{name}: the message holds only the stderr tail ({} bytes)", text.len());
        assert_eq!(err.exit_code(), 2, "{name}");
        assert!(started.elapsed() < Duration::from_secs(20), "{name}: took {:?}", started.elapsed());
        assert!(!tree.clip_complete(i as u32 + 1), "{name}");
    }
    // Every failed clip was cleaned up.
    assert_eq!(tree_listing(&dir.path("outputs/video")), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// The outputs tree

#[test]
fn outputs_tree_is_complete_and_reruns_skip_complete_clips() {
    let dir = TempDir::new("out-tree");
    let root = dir.path("outputs");
    let tree = OutputTree::open(&root).unwrap();
    let choice = if ffmpeg_tools() { Mp4Choice::Auto } else { Mp4Choice::BuiltIn };
    let clips: Vec<Vec<RgbImage>> = (0..2).map(|c| (0..4).map(|t| frame(96, 64, t + 10 * c)).collect()).collect();
    let prompts = ["1girl, blue hair, dynamic lighting, action pose", "a quiet street at night, rain"];
    for (c, frames) in clips.iter().enumerate() {
        let report = write_clip(&tree, c as u32 + 1, &options(96, 64, 10, choice.clone()), frames);
        assert!(tree.clip_complete(c as u32 + 1) && report.frames == 4);
    }
    let cells: Vec<GridCell> =
        clips.iter().zip(prompts).map(|(f, p)| GridCell { image: f[0].clone(), caption: p.to_string() }).collect();
    let grid = tree.write_prompt_grid("run1", &cells).unwrap();
    let config = serde_json::json!({"sampler": "lcm", "steps": 4, "seed": 42, "prompts": prompts});
    tree.write_config("pipeline_config.json", &config).unwrap();
    tree.write_config("lora_versions.json", &serde_json::json!([])).unwrap();
    tree.write_config("controlnet_config.json", &serde_json::json!({"units": []})).unwrap();

    let mut expected = vec![
        "configs/",
        "configs/controlnet_config.json",
        "configs/lora_versions.json",
        "configs/pipeline_config.json",
        "images/",
        "images/prompt_grid_run1.png",
        "video/",
    ];
    let clip_files = |n: &str| {
        let mut v =
            vec![format!("video/clip_{n}/"), format!("video/clip_{n}/clip_{n}.mp4"), format!("video/clip_{n}/frames/")];
        v.extend((0..4).map(|t| format!("video/clip_{n}/frames/{t:06}.png")));
        v
    };
    let mut expected: Vec<String> = expected.drain(..).map(String::from).collect();
    expected.extend(clip_files("001"));
    expected.extend(clip_files("002"));
    expected.sort();
    assert_eq!(tree_listing(&root), expected);

    let read: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("configs/pipeline_config.json")).unwrap()).unwrap();
    assert_eq!(read, config);

    // The grid: both thumbnails at full size (96 wide fits), in place, with ink under each.
    let g = decode_png(&std::fs::read(&grid).unwrap()).unwrap();
    let gw = g.width() as usize;
    let at = |x: usize, y: usize| &g.pixels()[(y * gw + x) * 3..(y * gw + x) * 3 + 3];
    for (c, frames) in clips.iter().enumerate() {
        let x0 = 16 + c * (96 + 16);
        for y in 0..64 {
            for x in 0..96 {
                let src = &frames[0].pixels()[(y * 96 + x) * 3..(y * 96 + x) * 3 + 3];
                assert_eq!(at(x0 + x, 16 + y), src, "grid cell {c} pixel ({x}, {y})");
            }
        }
        let ink = (16 + 64..g.height() as usize)
            .flat_map(|y| (x0..x0 + 96).map(move |x| (x, y)))
            .filter(|&(x, y)| at(x, y) != [255, 255, 255])
            .count();
        assert!(ink > 50, "cell {c}: {ink} caption pixels");
    }

    // A rerun: the tree opens again, sees both clips complete, refuses to restart one unless
    // asked to replace it.
    drop(tree);
    let tree = OutputTree::open(&root).unwrap();
    assert!(tree.clip_complete(1) && tree.clip_complete(2) && !tree.clip_complete(3));
    let err = tree.begin_clip(1, &options(96, 64, 10, choice.clone())).err().unwrap();
    assert!(err.to_string().contains("complete already"), "{err}");
    let mut opts = options(96, 64, 10, choice);
    opts.replace = true;
    let replacement: Vec<RgbImage> = (0..3).map(|t| noise(96, 64, t)).collect();
    let report = write_clip(&tree, 1, &opts, &replacement);
    assert_eq!(report.frames, 3);
    let listing = tree_listing(&root.join("video/clip_001"));
    assert_eq!(listing.iter().filter(|p| p.ends_with(".png")).count(), 3, "{listing:?}");
    let back = decode_png(&std::fs::read(root.join("video/clip_001/frames/000002.png")).unwrap()).unwrap();
    assert_eq!(back.pixels(), replacement[2].pixels());
    assert!(tree_listing(&root.join("video")).iter().all(|p| !p.starts_with('.')));

    // Names are checked.
    assert!(tree.write_config("../x.json", &config).is_err());
    assert!(tree.write_config("x.txt", &config).is_err());
    assert!(tree.write_prompt_grid("a/b", &cells).is_err());
}

#[test]
fn one_run_at_a_time_and_unwritable_folders_are_clear_errors() {
    let dir = TempDir::new("out-lock");
    let root = dir.path("outputs");
    let tree = OutputTree::open(&root).unwrap();
    let err = OutputTree::open(&root).err().unwrap();
    assert!(err.to_string().contains("another celframe run") && err.exit_code() == 2, "{err}");
    drop(tree);
    OutputTree::open(&root).unwrap();
    // A lock released within the grace period (as when a child forked by another thread still
    // holds a copy of the descriptor until its exec) is waited for, not reported as another run.
    let tree = OutputTree::open(&root).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(tree);
    });
    OutputTree::open(&root).unwrap();
    release.join().unwrap();

    // A path through a regular file, and a root that is a file.
    std::fs::write(dir.path("file"), b"x").unwrap();
    for bad in [dir.path("file/outputs"), dir.path("file")] {
        let err = OutputTree::open(&bad).err().unwrap();
        assert!(err.to_string().contains(&dir.path("file").display().to_string()) && err.exit_code() == 2, "{err}");
    }
    // A config path that exists as a folder is refused, not replaced.
    let tree = OutputTree::open(&root).unwrap();
    std::fs::create_dir(root.join("configs/x.json")).unwrap();
    let err = tree.write_config("x.json", &serde_json::json!(1)).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Interrupted runs (a child process writes a clip; the test kills it or starves it of disk)

/// Runs by the tests below in a child process (`--ignored --exact child_writer`), configured by
/// environment variables: writes clip 1 of CELFRAME_CHILD_FRAMES frames of CELFRAME_CHILD_KIND
/// ("gradient" or "noise") into the tree at CELFRAME_CHILD_OUT, sleeping CELFRAME_CHILD_SLEEP_MS
/// between frames, with PNG frames unless CELFRAME_CHILD_PNG=0. Prints `CHILD-ERROR <exit code>: <message>` and exits with the code on error.
#[test]
#[ignore = "helper: run in a child process by the interruption tests"]
fn child_writer() {
    let Ok(out) = std::env::var("CELFRAME_CHILD_OUT") else { return };
    let var = |k: &str| std::env::var(k).unwrap();
    let frames: u32 = var("CELFRAME_CHILD_FRAMES").parse().unwrap();
    let sleep = Duration::from_millis(var("CELFRAME_CHILD_SLEEP_MS").parse().unwrap());
    let choice = match var("CELFRAME_CHILD_MP4").as_str() {
        "ffmpeg" => Mp4Choice::Ffmpeg,
        _ => Mp4Choice::BuiltIn,
    };
    let run = || -> celframe::Result<()> {
        let tree = OutputTree::open(Path::new(&out))?;
        tree.write_config("pipeline_config.json", &serde_json::json!({"frames": frames}))?;
        let mut opts = options(128, 96, 10, choice);
        opts.png_frames = std::env::var("CELFRAME_CHILD_PNG").as_deref() != Ok("0");
        let mut clip = tree.begin_clip(1, &opts)?;
        for t in 0..frames {
            let f = if var("CELFRAME_CHILD_KIND") == "noise" { noise(128, 96, t as u64) } else { frame(128, 96, t) };
            clip.push(f)?;
            std::thread::sleep(sleep);
        }
        clip.finish()?;
        Ok(())
    };
    if let Err(e) = run() {
        println!("CHILD-ERROR {}: {e}", e.exit_code());
        std::process::exit(e.exit_code() as i32);
    }
}

fn child(out: &Path, frames: u32, sleep_ms: u32, kind: &str, mp4: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_writer", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CELFRAME_CHILD_OUT", out)
        .env("CELFRAME_CHILD_FRAMES", frames.to_string())
        .env("CELFRAME_CHILD_SLEEP_MS", sleep_ms.to_string())
        .env("CELFRAME_CHILD_KIND", kind)
        .env("CELFRAME_CHILD_MP4", mp4);
    cmd
}

/// Every regular file whose name does not start with '.' under `root` is complete: PNGs decode,
/// mp4s pass ffprobe, JSON parses. Returns those names.
fn assert_only_complete_files(root: &Path, ffmpeg: bool) -> Vec<String> {
    let mut seen = Vec::new();
    for rel in tree_listing(root) {
        if rel.ends_with('/') || rel.split('/').any(|part| part.starts_with('.')) {
            continue;
        }
        let path = root.join(&rel);
        let bytes = std::fs::read(&path).unwrap();
        if rel.ends_with(".png") {
            decode_png(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
        } else if rel.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
        } else if rel.ends_with(".mp4") && ffmpeg {
            probe(&path);
        } else if !rel.ends_with(".mp4") {
            panic!("unexpected file {rel}");
        }
        seen.push(rel);
    }
    seen
}

#[test]
fn killed_mid_clip_leaves_no_half_written_file_and_the_rerun_completes() {
    let ffmpeg = ffmpeg_tools();
    for mp4 in if ffmpeg { vec!["ffmpeg", "builtin"] } else { vec!["builtin"] } {
        let dir = TempDir::new("out-kill");
        let root = dir.path("outputs");
        let mut proc = child(&root, 200, 30, "gradient", mp4).stdout(Stdio::null()).spawn().unwrap();
        // Wait until PNGs are landing in the partial clip folder, then SIGKILL.
        let partial = root.join("video/.clip_001.partial/frames");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0) < 5 {
            assert!(Instant::now() < deadline, "{mp4}: the child wrote no frames");
            assert!(proc.try_wait().unwrap().is_none(), "{mp4}: the child exited early");
            std::thread::sleep(Duration::from_millis(10));
        }
        proc.kill().unwrap();
        proc.wait().unwrap();
        // Nothing outlives the render: an orphaned ffmpeg would see EOF and go on writing the
        // partial mp4 (and race the sweep below).
        let sizes = |root: &Path| -> Vec<(u64, String)> {
            let files = tree_listing(root).into_iter().filter(|rel| !rel.ends_with('/'));
            files.map(|rel| (root.join(&rel).metadata().map(|m| m.len()).unwrap_or(0), rel)).collect()
        };
        let at_kill = sizes(&root);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(sizes(&root), at_kill, "{mp4}: files changed after the render was killed");

        let tree = OutputTree::open(&root).unwrap_or_else(|e| panic!("{mp4}: reopening: {e}"));
        // Before the sweep on open: nothing but the config had a real name, and it is complete.
        // (open swept the leftovers; check the real names and that the clip is not complete.)
        assert!(!tree.clip_complete(1), "{mp4}");
        assert_eq!(assert_only_complete_files(&root, ffmpeg), vec!["configs/pipeline_config.json"], "{mp4}");
        assert_eq!(tree_listing(&root.join("video")), Vec::<String>::new(), "{mp4}: leftovers not swept");
        drop(tree);

        // The rerun finishes the clip.
        let out = child(&root, 6, 0, "gradient", mp4).output().unwrap();
        assert!(out.status.success(), "{mp4}: rerun: {}", String::from_utf8_lossy(&out.stdout));
        let files = assert_only_complete_files(&root, ffmpeg);
        assert_eq!(files.len(), 1 + 1 + 6, "{mp4}: {files:?}");
        assert!(OutputTree::open(&root).unwrap().clip_complete(1));
    }
}

#[test]
fn leftovers_of_a_kill_are_only_dot_names() {
    // Kill without reopening: the raw state on disk holds real names only for complete files.
    let dir = TempDir::new("out-raw");
    let root = dir.path("outputs");
    let mut proc = child(&root, 200, 20, "gradient", "builtin").stdout(Stdio::null()).spawn().unwrap();
    let partial = root.join("video/.clip_001.partial/frames");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline && proc.try_wait().unwrap().is_none(), "the child wrote no frames");
        std::thread::sleep(Duration::from_millis(5));
    }
    proc.kill().unwrap();
    proc.wait().unwrap();
    let listing = tree_listing(&root);
    assert!(!listing.iter().any(|p| p.starts_with("video/clip_001")), "{listing:?}");
    assert!(listing.iter().any(|p| p.starts_with("video/.clip_001.partial/frames/0")), "{listing:?}");
    assert_eq!(assert_only_complete_files(&root, false), vec!["configs/pipeline_config.json"]);
}

#[test]
fn disk_full_while_writing_is_a_clear_error_with_nothing_half_written() {
    // A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail with EFBIG
    // at the same calls a full disk fails with ENOSPC. SIGXFSZ is ignored (the shell's trap is
    // inherited through exec), so the write returns the error instead of killing the process.
    // Cases: PNG frames and mp4 (the first PNG fails), and the mp4 alone through each encoder
    // (the built-in encoder's sample file fails; ffmpeg fails and its message is reported).
    let ffmpeg = ffmpeg_tools();
    let mut cases = vec![("builtin", true, "File too large"), ("builtin", false, "File too large")];
    if ffmpeg {
        cases.extend([("ffmpeg", true, "File too large"), ("ffmpeg", false, "ffmpeg failed")]);
    }
    for (mp4, png, message) in cases {
        let dir = TempDir::new("out-full");
        let root = dir.path("outputs");
        let mut cmd = child(&root, 30, 0, "noise", mp4);
        cmd.env("CELFRAME_CHILD_PNG", if png { "1" } else { "0" });
        // 128x96 noise frames are ~37 KB as PNG and about as much as H.264; the limit is 64 blocks
        // of 512 bytes = 32 KB per file.
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut sh = Command::new("sh");
        sh.arg("-c").arg("trap '' XFSZ; ulimit -f 64; exec \"$@\"").arg("sh").arg(program).args(args);
        for (k, v) in cmd.get_envs() {
            sh.env(k, v.unwrap());
        }
        let started = Instant::now();
        let out = sh.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{mp4}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let line = stdout
            .lines()
            .find_map(|l| l.find("CHILD-ERROR").map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("{mp4}: {stdout}"));
        assert!(line.contains(message), "{mp4}, png {png}: {line}");
        assert!(started.elapsed() < Duration::from_secs(60), "{mp4}");
        // The failed clip was removed; the config (small) was written whole.
        let listing = tree_listing(&root.join("video"));
        assert_eq!(listing, Vec::<String>::new(), "{mp4}");
        assert_eq!(assert_only_complete_files(&root, ffmpeg), vec!["configs/pipeline_config.json"], "{mp4}");
    }
}

#[test]
fn dropping_a_clip_writer_aborts_it() {
    let dir = TempDir::new("out-abort");
    let tree = OutputTree::open(&dir.path("outputs")).unwrap();
    let choices = if ffmpeg_tools() { vec![Mp4Choice::Ffmpeg, Mp4Choice::BuiltIn] } else { vec![Mp4Choice::BuiltIn] };
    for (i, choice) in choices.into_iter().enumerate() {
        let mut clip = tree.begin_clip(i as u32 + 1, &options(128, 64, 10, choice)).unwrap();
        for t in 0..10 {
            clip.push(frame(128, 64, t)).unwrap();
        }
        drop(clip);
        assert_eq!(tree_listing(&dir.path("outputs/video")), Vec::<String>::new());
    }
}
