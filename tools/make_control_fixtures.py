#!/usr/bin/env python3
"""Writes tests/fixtures/control_*: references for src/control, made with OpenCV, Pillow and
diffusers, for tests/control_inputs.rs.

Needs: opencv-python-headless, numpy, Pillow, matplotlib (controlnet_aux colours hand edges with
its hsv_to_rgb), diffusers 0.42.1 (no weights, no network).

Every image is an 8-bit RGB PNG (single-channel results are written as three equal channels).

Pose (controlnet_aux's `open_pose/util.py` `draw_bodypose` convention, as ControlNet openpose
models were trained on it; re-stated here from its facts, not imported):
  control_pose_coco.json       ecosystem JSON: COCO-18, [0,1] coordinates, canvas_width/height,
                               two people, missing points as 0,0,0
  control_pose_body25.json     native OpenPose JSON: BODY_25 in pixels of a 128x96 frame, real
                               confidences (one point under the 0.05 render threshold)
  control_pose_random.json     six people of random points (normalised)
  control_pose_coco_96x128.png, control_pose_coco_160x120.png, control_pose_body25_128x96.png,
  control_pose_random_{200x150,150x200}.png
                               the skeletons drawn with cv2.ellipse2Poly + cv2.fillConvexPoly
                               (limb colour x 0.6, int-truncated) then cv2.circle radius 4
Hands and faces (controlnet_aux `draw_handpose` / `draw_facepose`, re-stated below; they agree with
controlnet_aux 0.0.10's own functions on random hands, checked once by hand):
  control_pose_hands.json      ecosystem JSON: two people, both hands / one hand with missing points
                               and points on pixel column 0, 70- and 68-point faces
  control_pose_hands_random.json
                               native OpenPose JSON in pixels of 200x150, random hands and faces,
                               real confidences (some under the hand 0.2 / face 0.4 thresholds)
  control_pose_hands_{320x240,240x320}.png, control_pose_hands_random_200x150.png
Pose interpolation (every point known at both keyframes moved linearly; others not drawn):
  control_pose_interp/{a,b}.json and control_pose_interp_{1,2}of3_256x192.png (a third and two
  thirds of the way)
Canny (`cv2.Canny(image, 100, 200)`, what controlnet_aux's CannyDetector runs, on the RGB array):
  control_canny_in_{shapes,gray,noise}.png and control_canny_ref_{shapes,gray,noise}.png
Depth (a float map from numpy.save and its hint, min-max to 0..255, near = bright):
  control_depth.npy, control_depth_hint.png, control_depth_hint_inverted.png
Control-image preparation (diffusers StableDiffusionXLControlNetPipeline's control_image_processor:
VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False), PIL input):
  control_prepare_in.png, control_prepare_WxH.png: the preprocessed tensor x 255 (it is exactly
  the PIL Lanczos resize / 255; the script asserts so)

Run from the repository root: python tools/make_control_fixtures.py
"""

import json
import math
import os

import cv2
import matplotlib.colors
import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

# controlnet_aux draw_bodypose: limbs as 1-based COCO-18 pairs, in drawing and colour order.
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
          [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
          [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
# BODY_25 index of each COCO-18 point (MidHip and the feet dropped), OpenPose doc/02_output.md.
BODY25_TO_COCO = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
RENDER_THRESHOLD = 0.05  # OpenPose's default --render_threshold for body points


def save_rgb(name, array):
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    PIL.Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB").save(os.path.join(OUT, name))


def draw_body(canvas, points):
    """points: 18 (x, y) in [0,1] or None. Limbs, then keypoint circles."""
    height, width = canvas.shape[:2]
    for limb, (a, b) in enumerate(LIMBS):
        pa, pb = points[a - 1], points[b - 1]
        if pa is None or pb is None:
            continue
        ys = np.array([pa[0], pb[0]]) * float(width)
        xs = np.array([pa[1], pb[1]]) * float(height)
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(ys)), int(np.mean(xs))), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in COLORS[limb]])
    for j, p in enumerate(points):
        if p is not None:
            cv2.circle(canvas, (int(p[0] * width), int(p[1] * height)), 4, COLORS[j], thickness=-1)


def draw_bodypose(people, width, height):
    """people: lists of 18 (x, y) in [0,1] or None, drawn one after the other on black."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for points in people:
        draw_body(canvas, points)
    return canvas


# controlnet_aux draw_handpose / draw_facepose: 20 hand edges (0 = wrist, then thumb, index,
# middle, ring, little finger from base to tip), edge e coloured matplotlib hsv_to_rgb(e / 20, 1, 1)
# x 255 with a 2 px cv2.line, points blue radius 4; face points white radius 3. A point is skipped
# unless int(x * W) > 0.01 and int(y * H) > 0.01.
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
EPS = 0.01
HAND_THRESHOLD, FACE_THRESHOLD = 0.2, 0.4  # OpenPose's hand/face render thresholds


def draw_handpose(canvas, points):
    """points: 21 (x, y) in [0,1] or None (None is skipped like a point at 0,0)."""
    h, w = canvas.shape[:2]
    pixel = lambda p: (0, 0) if p is None else (int(p[0] * w), int(p[1] * h))
    for e, (a, b) in enumerate(HAND_EDGES):
        (x1, y1), (x2, y2) = pixel(points[a]), pixel(points[b])
        if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), matplotlib.colors.hsv_to_rgb([e / float(len(HAND_EDGES)), 1.0, 1.0]) * 255,
                     thickness=2)
    for p in points:
        x, y = pixel(p)
        if x > EPS and y > EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def draw_facepose(canvas, points):
    h, w = canvas.shape[:2]
    for p in points:
        if p is None:
            continue
        x, y = int(p[0] * w), int(p[1] * h)
        if x > EPS and y > EPS:
            cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def draw_poses(people, width, height):
    """people: dicts with "body" (18 points) and optionally "left", "right" (21 points) and "face"
    (70 or 68), points (x, y) in [0,1] or None; per person body, left hand, right hand, face
    (controlnet_aux open_pose/__init__.py draw_poses)."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in people:
        draw_body(canvas, person["body"])
        for key in ("left", "right"):
            if person.get(key) is not None:
                draw_handpose(canvas, person[key])
        if person.get("face") is not None:
            draw_facepose(canvas, person["face"])
    return canvas


def pose_fixtures():
    rng = np.random.RandomState(15)
    # A standing figure (x, y in [0,1]) with a raised right arm, and a smaller second one.
    figure = [(0.50, 0.14), (0.50, 0.25), (0.38, 0.26), (0.28, 0.17), (0.25, 0.06), (0.62, 0.26), (0.66, 0.40),
              (0.70, 0.52), (0.43, 0.52), (0.42, 0.70), (0.41, 0.90), (0.57, 0.52), (0.60, 0.71), (0.63, 0.93),
              (0.47, 0.12), (0.53, 0.12), (0.44, 0.13), (0.56, 0.13)]
    jitter = lambda p: (float(np.clip(p[0] + rng.uniform(-0.02, 0.02), 0, 1)), float(np.clip(p[1] + rng.uniform(-0.02, 0.02), 0, 1)))
    first = [jitter(p) for p in figure]
    second = [(0.8 + 0.35 * (x - 0.5), 0.3 + 0.45 * y) for x, y in figure]
    second[4] = (0.99, 0.31)  # a wrist at the right edge: its circle is clipped
    second_missing = {6, 7, 13, 16}  # LElbow, LWrist, LAnkle, REar

    def flat(points, missing):
        out = []
        for i, (x, y) in enumerate(points):
            out += [0.0, 0.0, 0.0] if i in missing else [round(x, 5), round(y, 5), 1.0]
        return out

    coco = {"canvas_width": 96, "canvas_height": 128, "people": [
        {"pose_keypoints_2d": flat(first, set()), "face_keypoints_2d": [], "hand_left_keypoints_2d": [],
         "hand_right_keypoints_2d": []},
        {"pose_keypoints_2d": flat(second, second_missing)}]}
    with open(os.path.join(OUT, "control_pose_coco.json"), "w") as f:
        json.dump(coco, f, indent=1)

    def parsed_coco(person):
        kp = person["pose_keypoints_2d"]
        return [None if kp[3 * i + 2] <= RENDER_THRESHOLD else (kp[3 * i], kp[3 * i + 1]) for i in range(18)]

    people = [parsed_coco(p) for p in coco["people"]]
    save_rgb("control_pose_coco_96x128.png", draw_bodypose(people, 96, 128))
    save_rgb("control_pose_coco_160x120.png", draw_bodypose(people, 160, 120))

    # BODY_25 in pixels of a 128x96 frame, confidences in (0.05, 1); MidHip and feet filled in.
    w, h = 128, 96
    body25 = [None] * 25
    for coco_index, b in enumerate(BODY25_TO_COCO):
        x, y = first[coco_index]
        body25[b] = [round(x * w, 3), round(y * h, 3), round(float(rng.uniform(0.3, 0.95)), 3)]
    body25[8] = [0.5 * w, 0.52 * h, 0.8]
    for b in range(19, 25):
        body25[b] = [float(rng.uniform(40, 90)), float(rng.uniform(85, 95)), 0.6]
    body25[17][2] = 0.02  # REar under the render threshold: not drawn
    native = {"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": [v for p in body25 for v in p],
                                         "face_keypoints_2d": [], "hand_left_keypoints_2d": [],
                                         "hand_right_keypoints_2d": []}]}
    with open(os.path.join(OUT, "control_pose_body25.json"), "w") as f:
        json.dump(native, f, indent=1)
    points = []
    for b in BODY25_TO_COCO:
        x, y, c = body25[b]
        points.append(None if c <= RENDER_THRESHOLD else (x / w, y / h))
    save_rgb("control_pose_body25_128x96.png", draw_bodypose([points], w, h))

    # Stress: six people of random points (limbs of every length and angle, crossings, points on
    # the border, a fifth missing), drawn at two aspect ratios.
    people = []
    for _ in range(6):
        points = [(round(float(x), 5), round(float(y), 5)) for x, y in rng.uniform(0, 1, (18, 2))]
        points[0] = (0.0, round(float(rng.uniform(0, 1)), 5))
        people.append([None if rng.uniform() < 0.2 else p for p in points])
    stress = {"canvas_width": 1, "canvas_height": 1, "people": [
        {"pose_keypoints_2d": [v for p in person for v in ([0, 0, 0] if p is None else [p[0], p[1], 1.0])]}
        for person in people]}
    with open(os.path.join(OUT, "control_pose_random.json"), "w") as f:
        json.dump(stress, f)
    save_rgb("control_pose_random_200x150.png", draw_bodypose(people, 200, 150))
    save_rgb("control_pose_random_150x200.png", draw_bodypose(people, 150, 200))


def hand_face_fixtures():
    rng = np.random.RandomState(21)
    figure_w, figure_h = 0.5, 0.8

    def hand_at(x0, y0, size, angle):
        """A spread hand: the wrist, then five fingers of four points fanning out."""
        points = [(x0, y0)]
        for finger in range(5):
            a = angle + (finger - 2) * 0.35
            for joint in range(1, 5):
                r = size * (0.3 + 0.18 * joint) * (0.8 if finger == 0 else 1.0)
                points.append((x0 + r * math.cos(a), y0 + r * math.sin(a)))
        return points

    def face_at(x0, y0, size, count):
        """An oval of landmarks (jaw, brows, nose, eyes, mouth stand-ins)."""
        return [(x0 + size * 0.5 * math.cos(t) * (0.6 + 0.4 * (k % 3) / 2),
                 y0 + size * 0.6 * math.sin(t) * (0.6 + 0.4 * (k % 3) / 2))
                for k, t in enumerate(np.linspace(0, 2 * math.pi, count, endpoint=False))]

    def flat(points, missing=()):
        out = []
        for i, p in enumerate(points):
            out += [0.0, 0.0, 0.0] if p is None or i in missing else [round(p[0], 5), round(p[1], 5), 1.0]
        return out

    def parsed(values, threshold):
        return [None if values[3 * i + 2] <= threshold else (values[3 * i], values[3 * i + 1]) for i in range(len(values) // 3)]

    # Ecosystem JSON (normalised, c = 1 or 0): person 0 with both hands and a 70-point face,
    # person 1 with a right hand with missing points and one on pixel column 0 (skipped), and a
    # 68-point (DWPose) face.
    body0 = [(0.3 + 0.4 * x * figure_w, 0.1 + y * figure_h) for x, y in
             [(0.5, 0.1), (0.5, 0.24), (0.3, 0.26), (0.15, 0.35), (0.05, 0.45), (0.7, 0.26), (0.85, 0.35),
              (0.95, 0.45), (0.38, 0.55), (0.36, 0.75), (0.35, 0.95), (0.62, 0.55), (0.64, 0.75), (0.65, 0.95),
              (0.46, 0.08), (0.54, 0.08), (0.42, 0.09), (0.58, 0.09)]]
    left0 = hand_at(body0[7][0], body0[7][1], 0.25, 0.9)
    right0 = hand_at(body0[4][0], body0[4][1], 0.25, 2.2)
    face0 = face_at(body0[0][0], body0[0][1], 0.2, 70)
    body1 = [(min(x + 0.45, 0.999), y * 0.7 + 0.25) for x, y in body0]
    right1 = hand_at(0.02, 0.5, 0.3, 0.3)  # reaches the left border: points at pixel 0 are skipped
    right1[0] = (0.0, 0.5)
    face1 = face_at(body1[0][0], body1[0][1], 0.15, 68)
    ecosystem = {"canvas_width": 320, "canvas_height": 240, "people": [
        {"pose_keypoints_2d": flat(body0), "hand_left_keypoints_2d": flat(left0),
         "hand_right_keypoints_2d": flat(right0), "face_keypoints_2d": flat(face0)},
        {"pose_keypoints_2d": flat(body1, {6, 7}), "hand_left_keypoints_2d": [],
         "hand_right_keypoints_2d": flat(right1, {3, 4, 12}), "face_keypoints_2d": flat(face1, {5})}]}
    with open(os.path.join(OUT, "control_pose_hands.json"), "w") as f:
        json.dump(ecosystem, f)
    people = [{"body": parsed(p["pose_keypoints_2d"], RENDER_THRESHOLD),
               "left": parsed(p["hand_left_keypoints_2d"], HAND_THRESHOLD) if p["hand_left_keypoints_2d"] else None,
               "right": parsed(p["hand_right_keypoints_2d"], HAND_THRESHOLD),
               "face": parsed(p["face_keypoints_2d"], FACE_THRESHOLD)} for p in ecosystem["people"]]
    save_rgb("control_pose_hands_320x240.png", draw_poses(people, 320, 240))
    save_rgb("control_pose_hands_240x320.png", draw_poses(people, 240, 320))

    # Native OpenPose JSON in pixels of a 200x150 frame with real confidences (some hand points
    # under 0.2 and face points under 0.4, not drawn): three people of random hands (edges of every
    # length and direction) and faces.
    w, h = 200, 150
    native = {"version": 1.3, "people": []}
    for _ in range(3):
        body = [[float(rng.uniform(10, 190)), float(rng.uniform(10, 140)), float(rng.uniform(0.3, 1))] for _ in range(25)]
        hands = [[[float(rng.uniform(-5, 205)), float(rng.uniform(-5, 155)), float(rng.uniform(0.1, 1))]
                  for _ in range(21)] for _ in range(2)]
        face = [[float(rng.uniform(0, 200)), float(rng.uniform(0, 150)), float(rng.uniform(0.2, 1))] for _ in range(70)]
        native["people"].append({"person_id": [-1], "pose_keypoints_2d": [round(v, 3) for p in body for v in p],
                                 "hand_left_keypoints_2d": [round(v, 3) for p in hands[0] for v in p],
                                 "hand_right_keypoints_2d": [round(v, 3) for p in hands[1] for v in p],
                                 "face_keypoints_2d": [round(v, 3) for p in face for v in p]})
    with open(os.path.join(OUT, "control_pose_hands_random.json"), "w") as f:
        json.dump(native, f)
    people = []
    for p in native["people"]:
        def pixels(values, threshold):
            return [None if q is None else (q[0] / w, q[1] / h) for q in parsed(values, threshold)]
        body25 = pixels(p["pose_keypoints_2d"], RENDER_THRESHOLD)
        people.append({"body": [body25[b] for b in BODY25_TO_COCO],
                       "left": pixels(p["hand_left_keypoints_2d"], HAND_THRESHOLD),
                       "right": pixels(p["hand_right_keypoints_2d"], HAND_THRESHOLD),
                       "face": pixels(p["face_keypoints_2d"], FACE_THRESHOLD)})
    save_rgb("control_pose_hands_random_200x150.png", draw_poses(people, w, h))

    # Pose interpolation between two keyframes (control_pose_interp/a.json at the first frame,
    # b.json at the fourth): every point known in both moves linearly, p + (q - p) * t with
    # t = 1/3 and 2/3; a point, hand or person missing at either end is not drawn in between.
    folder = os.path.join(OUT, "control_pose_interp")
    os.makedirs(folder, exist_ok=True)
    moved_body = [(x + 0.1 * math.sin(3 * y), y - 0.05) for x, y in body0]
    moved_right = hand_at(moved_body[4][0], moved_body[4][1], 0.25, 1.6)
    a = {"people": [{"pose_keypoints_2d": flat(body0, {16}), "hand_right_keypoints_2d": flat(right0),
                     "hand_left_keypoints_2d": flat(left0), "face_keypoints_2d": flat(face0)},
                    {"pose_keypoints_2d": flat(body1)}]}
    b = {"people": [{"pose_keypoints_2d": flat(moved_body, {3}), "hand_right_keypoints_2d": flat(moved_right, {8}),
                     "hand_left_keypoints_2d": [], "face_keypoints_2d": flat(face_at(0.5, 0.15, 0.2, 70))}]}
    for name, pose in [("a.json", a), ("b.json", b)]:
        with open(os.path.join(folder, name), "w") as f:
            json.dump(pose, f)

    def interpolate(p, q, t):
        if p is None or q is None or len(p) != len(q):
            return None
        return [None if u is None or v is None else (u[0] + (v[0] - u[0]) * t, u[1] + (v[1] - u[1]) * t)
                for u, v in zip(p, q)]

    def person(p):
        part = lambda key, threshold: parsed(p[key], threshold) if p.get(key) else None
        return {"body": parsed(p["pose_keypoints_2d"], RENDER_THRESHOLD), "left": part("hand_left_keypoints_2d", HAND_THRESHOLD),
                "right": part("hand_right_keypoints_2d", HAND_THRESHOLD), "face": part("face_keypoints_2d", FACE_THRESHOLD)}

    for k in (1, 2):
        t = k / 3
        people = [{key: interpolate(p[key], q[key], t) for key in ("body", "left", "right", "face")}
                  for p, q in zip(map(person, a["people"]), map(person, b["people"]))]
        save_rgb(f"control_pose_interp_{k}of3_256x192.png", draw_poses(people, 256, 192))


def canny_fixtures():
    rng = np.random.RandomState(7)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Smooth colour field (low-frequency noise, bilinear-upsampled) plus shapes and mild noise.
    field = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    img = field.copy()
    img[(xx - 20) ** 2 + (yy - 24) ** 2 < 121] = [230, 40, 60]
    img[8:30, 36:58] = [30, 200, 90]
    img[34:44, 10:60] = [200, 200, 40]
    img[np.abs((xx - 32) - 0.6 * (yy - 24)) < 2.0] = [20, 20, 220]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    save_rgb("control_canny_in_shapes.png", img)
    save_rgb("control_canny_ref_shapes.png", cv2.Canny(img, 100, 200))
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    save_rgb("control_canny_in_gray.png", gray)
    save_rgb("control_canny_ref_gray.png", cv2.Canny(np.stack([gray] * 3, axis=-1), 100, 200))

    # Noise at several scales in every channel: many weak edges, ties and diagonal directions.
    coarse = cv2.resize(rng.uniform(0, 255, (12, 16, 3)).astype(np.float32), (128, 96), interpolation=cv2.INTER_CUBIC)
    noisy = np.clip(coarse + rng.normal(0, 25, coarse.shape), 0, 255).astype(np.uint8)
    save_rgb("control_canny_in_noise.png", noisy)
    save_rgb("control_canny_ref_noise.png", cv2.Canny(noisy, 100, 200))


def depth_fixtures():
    # A disparity-like float map (near = large) saved by numpy, and its hint: per-image min-max to
    # [0, 255], rounded half up, three equal channels.
    yy, xx = np.mgrid[0:24, 0:32].astype(np.float64)
    depth = (1.0 / (1.0 + 0.1 * yy) + 0.3 * np.exp(-((xx - 20) ** 2 + (yy - 10) ** 2) / 20.0)).astype(np.float32)
    np.save(os.path.join(OUT, "control_depth.npy"), depth)
    d = depth.astype(np.float64)
    hint = np.floor((d - d.min()) / (d.max() - d.min()) * 255.0 + 0.5).astype(np.uint8)
    save_rgb("control_depth_hint.png", hint)
    save_rgb("control_depth_hint_inverted.png", 255 - hint)


def prepare_fixtures():
    rng = np.random.RandomState(3)
    h, w = 29, 37
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 256], axis=-1).astype(np.float64)
    img[10:20, 5:15] = [255, 255, 255]  # a sharp square: Lanczos rings at its edges (clipped)
    img[12:18, 7:13] = [0, 0, 0]
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    save_rgb("control_prepare_in.png", img)
    pil = PIL.Image.fromarray(img, "RGB")
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    # Both sides up, both down, width up and height down (Pillow's pass order differs), the reverse.
    for width, height in [(64, 48), (24, 16), (48, 16), (16, 40)]:
        tensor = processor.preprocess(pil, height=height, width=width).to(dtype=torch.float32)
        assert tuple(tensor.shape) == (1, 3, height, width), tensor.shape
        scaled = tensor[0].permute(1, 2, 0).numpy() * 255.0
        levels = np.round(scaled)
        assert np.abs(scaled - levels).max() < 1e-3, "diffusers' control tensor is not u8 / 255"
        direct = np.asarray(pil.resize((width, height), resample=PIL.Image.LANCZOS))
        assert np.array_equal(levels.astype(np.uint8), direct)
        save_rgb(f"control_prepare_{width}x{height}.png", levels.astype(np.uint8))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    pose_fixtures()
    hand_face_fixtures()
    canny_fixtures()
    depth_fixtures()
    prepare_fixtures()
    print("wrote tests/fixtures/control_*")
