//! Output-stage throughput on the CPU at the pipeline's frame size (1024x576): RGB -> YUV 4:2:0,
//! PNG encoding (one thread, in memory), PNG files through the pool (synced, renamed), the mp4
//! through each encoder path (the built-in one with 1, 2 and all threads: GOP workers and
//! OpenH264's slice threads), and a whole clip (PNGs + mp4) through `ClipWriter`. Prints one `BENCH {json}` line per entry. `cargo bench --bench output` (no GPU needed); the frames go to
//! a folder under the system temp dir, removed afterwards. CELFRAME_BENCH_FRAMES sets the clip
//! length (default 48).

use std::time::Instant;

use celframe::output::{ClipOptions, Fps, Mp4Choice, OutputTree, PngPool, RgbImage, encode_png, rgb_to_yuv420};

const W: u32 = 1024;
const H: u32 = 576;

/// A cel-like test frame: smooth gradient sky, flat-colour shapes with dark outlines, moving with
/// `t`; `grain` adds per-pixel texture of +-grain levels (a decoded SDXL frame is never this flat:
/// grain 8 gives PNGs of about the size of real 1024x576 renders, ~1 MB).
fn frame(t: u32, grain: i32) -> RgbImage {
    let (w, h) = (W as usize, H as usize);
    let mut px = vec![0u8; w * h * 3];
    let shapes: [(usize, usize, usize, [u8; 3]); 4] = [
        (120, 300, 90, [240, 200, 180]),
        (500, 260, 140, [90, 140, 220]),
        (760, 380, 70, [250, 230, 120]),
        (300, 120, 50, [200, 90, 110]),
    ];
    for y in 0..h {
        for x in 0..w {
            let mut c = [(60 + y * 120 / h) as u8, (110 + y * 100 / h) as u8, (200 + x * 40 / w) as u8];
            for (i, &(cx, cy, r, colour)) in shapes.iter().enumerate() {
                let cx = (cx + t as usize * (3 + i)) % w;
                let (dx, dy) = (x as i64 - cx as i64, y as i64 - cy as i64);
                let d2 = dx * dx + dy * dy;
                let r = r as i64;
                if d2 <= r * r {
                    c = if d2 >= (r - 3) * (r - 3) { [30, 25, 40] } else { colour };
                }
            }
            for (k, v) in c.iter_mut().enumerate() {
                let hash = ((x * 73856093) ^ (y * 19349663) ^ (k * 83492791) ^ (t as usize * 2654435761)) as u32;
                let noise = (hash.wrapping_mul(2654435761) >> 24) as i32 % (2 * grain + 1) - grain;
                *v = (*v as i32 + noise).clamp(0, 255) as u8;
            }
            px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
        }
    }
    RgbImage::new(W, H, px).unwrap()
}

fn report(name: &str, frames: usize, seconds: f64, extra: &str) {
    println!(
        "BENCH {{\"key\":\"output/{name}\",\"frames\":{frames},\"seconds\":{seconds:.3},\"fps\":{:.1},\"size\":\"{W}x{H}\"{extra}}}",
        frames as f64 / seconds
    );
}

fn main() {
    let n: usize = std::env::var("CELFRAME_BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(96);
    for (kind, grain) in [("cel", 0), ("textured", 8)] {
        let frames: Vec<RgbImage> = (0..n as u32).map(|t| frame(t, grain)).collect();
        run(kind, &frames);
    }
}

fn run(kind: &str, frames: &[RgbImage]) {
    let n = frames.len();
    let report = |name: &str, seconds: f64, extra: &str| report(&format!("{name}/{kind}"), n, seconds, extra);
    let dir = std::env::temp_dir().join(format!("celframe-bench-output-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let start = Instant::now();
    for f in frames {
        std::hint::black_box(rgb_to_yuv420(f).unwrap());
    }
    report("rgb_to_yuv420", start.elapsed().as_secs_f64(), "");

    let start = Instant::now();
    let mut bytes = 0;
    for f in frames {
        bytes += encode_png(f).unwrap().len();
    }
    report("png_encode_1_thread", start.elapsed().as_secs_f64(), &format!(",\"bytes_per_frame\":{}", bytes / n));

    let threads = PngPool::default_threads();
    let pool = PngPool::new(threads, 8).unwrap();
    let start = Instant::now();
    for (i, f) in frames.iter().enumerate() {
        pool.submit(dir.join(format!("{i:06}.png")), f.clone()).unwrap();
    }
    pool.finish().unwrap();
    report("png_files_pool", start.elapsed().as_secs_f64(), &format!(",\"threads\":{threads}"));

    let tree = OutputTree::open(&dir.join("outputs")).unwrap();
    let fps = Fps::whole(10).unwrap();
    let mut index = 0;
    let all = ClipOptions::new(W, H, fps).mp4_threads;
    let mut clip = |name: &str, mp4: Mp4Choice, png_frames: bool, threads: usize| {
        index += 1;
        let mut options = ClipOptions::new(W, H, fps);
        options.mp4 = mp4;
        options.png_frames = png_frames;
        options.mp4_threads = threads;
        let start = Instant::now();
        let mut writer = match tree.begin_clip(index, &options) {
            Ok(w) => w,
            Err(e) => {
                println!("# {name}: skipped ({e})");
                return;
            }
        };
        for f in frames {
            writer.push(f.clone()).unwrap();
        }
        let done = writer.finish().unwrap();
        let seconds = start.elapsed().as_secs_f64();
        let size = done.mp4.as_ref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
        let encoder = done.encoder.map(|e| e.to_string()).unwrap_or_default().replace('"', "'");
        let extra = format!(",\"mp4_bytes\":{size},\"encoder\":\"{encoder}\",\"mp4_threads\":{threads}");
        report(name, seconds, &extra);
    };
    for threads in [1, 2, all] {
        clip(&format!("mp4_built_in_{threads}_threads"), Mp4Choice::BuiltIn, false, threads);
    }
    clip("mp4_ffmpeg", Mp4Choice::Ffmpeg, false, all);
    clip("clip_png_and_mp4_auto", Mp4Choice::Auto, true, all);
    clip("clip_png_and_mp4_built_in", Mp4Choice::BuiltIn, true, all);
    drop(tree);
    let _ = std::fs::remove_dir_all(&dir);
}
