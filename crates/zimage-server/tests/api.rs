//! Every endpoint of `zimage serve` against the tiny fixture pipeline: images equal to
//! diffusers' recorded ones (the same fixtures the pipeline and command tests use), progress
//! with previews, cancelling, limits, authentication, and a JSON 4xx for every bad request.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use zimage_pipeline::record::png_parameters;
use zimage_server::{Limits, ServerConfig};
use zimage_test_support::pipeline::{load_png, psnr, MIN_PSNR_DB};

fn assert_matches(png: &[u8], fixture: &str, what: &str) {
    let db = psnr(&decode_png(png), &load_png(&pipeline_fixture(fixture)));
    println!("{what:<40} PSNR {db:.1} dB");
    assert!(db >= MIN_PSNR_DB, "{what}: {db:.1} dB");
}

#[test]
fn native_jobs_match_diffusers_and_stream_progress_with_previews() {
    let server = start(ServerConfig {
        limits: Limits {
            max_steps: 1000,
            ..Limits::default()
        },
        ..config()
    });
    let client = Client::new(server.address);
    // A long job holds the worker, so that the job under test is watched from before it starts.
    let blocker = client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a wall", "width": 64, "height": 64, "steps": 1000}),
        )
        .json();
    let blocker = blocker["id"].as_str().unwrap().to_string();
    let submitted = client.post_json(
        "/v1/jobs",
        &json!({"prompt": "a cat holding a sign that says hello world", "width": 64, "height": 64, "steps": 8, "guidance": 0.0, "seed": 42}),
    );
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let record = submitted.json();
    let id = record["id"].as_str().unwrap().to_string();
    assert_eq!(record["request"]["seed"], 42);

    // The stream starts with the job's state and ends with its outcome.
    let watcher = {
        let client = Client::new(server.address);
        let id = id.clone();
        std::thread::spawn(move || client.get(&format!("/v1/jobs/{id}/events")))
    };
    wait_until(30.0, "the watcher to subscribe", || {
        server
            .shared
            .queue
            .get(&id)
            .is_some_and(|j| j.watchers() > 0)
    });
    assert_eq!(
        client.get(&format!("/v1/jobs/{id}")).json()["state"],
        "queued"
    );
    client.delete(&format!("/v1/jobs/{blocker}"));
    let stream = watcher.join().unwrap();
    assert_eq!(stream.status, 200);
    assert!(stream.content_type.starts_with("text/event-stream"));
    let events = parse_events(&stream.text());
    assert_eq!(events[0].0, "state");
    assert_eq!(events.last().unwrap().0, "succeeded", "{events:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(name, _)| name == "progress")
        .map(|(_, data)| {
            assert_eq!(data["total"], 8);
            let preview = data["preview"].as_str().expect("a preview per step");
            let png = unb64(preview.strip_prefix("data:image/png;base64,").unwrap());
            // The latents' own resolution: 1/8 of the image.
            assert_eq!(decode_png(&png).dimensions(), (8, 8));
            data["step"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    assert_eq!(events[0].1["state"], "queued");
    assert!(events
        .iter()
        .any(|(name, data)| name == "state" && data["state"] == "running"));
    assert!(events
        .iter()
        .any(|(name, data)| name == "stage" && data["stage"] == "denoising"));

    let status = client.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["step"], 8);
    let url = status["images"][0].as_str().unwrap();
    let image = client.get(url);
    assert_eq!(image.status, 200);
    assert_eq!(image.content_type, "image/png");
    assert_matches(
        &image.body,
        "expected/t2i_turbo.png",
        "POST /v1/jobs t2i_turbo",
    );
    let parameters: Value = serde_json::from_str(&png_parameters(&image.body).unwrap()).unwrap();
    assert_eq!(parameters["seed"], 42);
    assert_eq!(
        parameters["prompt"],
        "a cat holding a sign that says hello world"
    );
    assert_eq!(parameters, status["parameters"][0]);

    // A finished job's stream is its record and nothing else.
    let again = parse_events(&client.get(&format!("/v1/jobs/{id}/events")).text());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1["state"], "succeeded");
}

#[test]
fn openai_generations_and_edits_match_diffusers() {
    let server = start(config());
    let client = Client::new(server.address);
    let models = client.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny");

    // Guidance with every knob, through the extensions.
    let reply = client.post_json(
        "/v1/images/generations",
        &json!({"model": "tiny", "prompt": "a cat holding a sign that says hello world", "size": "64x64",
                "response_format": "b64_json", "quality": "high", "negative_prompt": "blurry, low quality, watermark",
                "steps": 6, "guidance": 3.0, "cfg_normalization": 1.0, "cfg_truncation": 0.6, "seed": 7}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["zimage"]["seed"], 7);
    assert_matches(
        &unb64(body["data"][0]["b64_json"].as_str().unwrap()),
        "expected/t2i_guidance.png",
        "generations t2i_guidance",
    );

    // n images from one seed, non-square.
    let reply = client.post_json(
        "/v1/images/generations",
        &json!({"prompt": "a red fox in the snow, photograph", "size": "48x64", "n": 2, "steps": 4, "guidance": 0.0, "seed": 3}),
    );
    let body = reply.json();
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "{body}");
    for (i, item) in body["data"].as_array().unwrap().iter().enumerate() {
        let png = unb64(item["b64_json"].as_str().unwrap());
        assert_matches(
            &png,
            &format!("expected/t2i_two_per_prompt-{i}.png"),
            &format!("generations n=2 #{i}"),
        );
    }

    // Edits: image-to-image without a mask, inpainting with one (no alpha: white repaints).
    let image = std::fs::read(pipeline_fixture("inputs/image.png")).unwrap();
    let mask = std::fs::read(pipeline_fixture("inputs/mask.png")).unwrap();
    let reply = client.post_multipart(
        "/v1/images/edits",
        &[
            ("prompt", "an oil painting of a harbour"),
            ("strength", "0.6"),
            ("steps", "8"),
            ("guidance", "0"),
            ("seed", "5"),
        ],
        &[("image", "image.png", image.clone())],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_matches(
        &unb64(reply.json()["data"][0]["b64_json"].as_str().unwrap()),
        "expected/img2img.png",
        "edits img2img",
    );
    let reply = client.post_multipart(
        "/v1/images/edits",
        &[
            ("prompt", "a yellow balloon"),
            ("strength", "0.8"),
            ("steps", "8"),
            ("guidance", "0"),
            ("seed", "10"),
        ],
        &[
            ("image[]", "image.png", image.clone()),
            ("mask", "mask.png", mask.clone()),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_matches(
        &unb64(reply.json()["data"][0]["b64_json"].as_str().unwrap()),
        "expected/inpaint_partial.png",
        "edits inpaint",
    );

    // OpenAI's own mask convention: transparent pixels are edited.
    let gray = image::load_from_memory(&mask).unwrap().to_luma8();
    let rgba = image::RgbaImage::from_fn(gray.width(), gray.height(), |x, y| {
        let repaint = gray.get_pixel(x, y).0[0] >= 128;
        image::Rgba([0, 0, 0, if repaint { 0 } else { 255 }])
    });
    let mut alpha_mask = Vec::new();
    rgba.write_to(
        &mut std::io::Cursor::new(&mut alpha_mask),
        image::ImageFormat::Png,
    )
    .unwrap();
    let reply = client.post_multipart(
        "/v1/images/edits",
        &[
            ("prompt", "a yellow balloon"),
            ("strength", "0.8"),
            ("steps", "8"),
            ("guidance", "0"),
            ("seed", "10"),
        ],
        &[
            ("image", "image.png", image),
            ("mask", "mask.png", alpha_mask),
        ],
    );
    assert_matches(
        &unb64(reply.json()["data"][0]["b64_json"].as_str().unwrap()),
        "expected/inpaint_partial.png",
        "edits inpaint, alpha mask",
    );
}

#[test]
fn a1111_txt2img_and_img2img_match_diffusers() {
    let server = start(config());
    let client = Client::new(server.address);
    // cfg_scale 1.5 is diffusers' guidance 0.5.
    let reply = client.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a bowl of ramen, studio light", "negative_prompt": "cartoon", "width": 48, "height": 48,
                "steps": 5, "cfg_scale": 1.5, "seed": 13, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_matches(
        &unb64(body["images"][0].as_str().unwrap()),
        "expected/t2i_weak_guidance.png",
        "sdapi txt2img",
    );
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 13);
    assert_eq!(info["all_seeds"], json!([13]));

    let image = b64(&std::fs::read(pipeline_fixture("inputs/image.png")).unwrap());
    let mask = b64(&std::fs::read(pipeline_fixture("inputs/mask.png")).unwrap());
    let reply = client.post_json(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a yellow balloon", "init_images": [format!("data:image/png;base64,{image}")], "mask": mask,
                "denoising_strength": 0.8, "steps": 8, "cfg_scale": 1.0, "seed": 10, "mask_blur": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_matches(
        &unb64(reply.json()["images"][0].as_str().unwrap()),
        "expected/inpaint_partial.png",
        "sdapi img2img inpaint",
    );

    assert_eq!(
        client.get("/sdapi/v1/sd-models").json()[0]["model_name"],
        "tiny"
    );
    assert_eq!(client.get("/sdapi/v1/samplers").json()[0]["name"], "Euler");
    let progress = client.get("/sdapi/v1/progress").json();
    assert_eq!(progress["state"]["job_count"], 0);
}

#[test]
fn adapters_are_named_from_the_folder_and_switched_per_job() {
    let dir = zimage_test_support::scratch("server-loras");
    let lora = zimage_test_support::fixtures().join("lora");
    for file in [
        "peft.safetensors",
        "kohya.safetensors",
        "not_a_lora.safetensors",
    ] {
        std::fs::copy(lora.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "not an adapter").unwrap();
    let server = start(ServerConfig {
        lora_dir: Some(dir.clone()),
        ..config()
    });
    let client = Client::new(server.address);
    let names: Vec<String> = client.get("/v1/loras").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kohya", "not_a_lora", "peft"]);

    let generate = |loras: Value| {
        client.post_json(
            "/v1/images/generations",
            &json!({"prompt": "a cat holding a sign that says hello world", "size": "64x64", "steps": 4, "guidance": 0.0, "seed": 42, "loras": loras}),
        )
    };
    let check = |reply: support::Reply, fixture: &str| {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let png = unb64(reply.json()["data"][0]["b64_json"].as_str().unwrap());
        let db = psnr(
            &decode_png(&png),
            &load_png(
                &zimage_test_support::fixtures()
                    .join("lora/expected")
                    .join(fixture),
            ),
        );
        println!("adapters {fixture:<32} PSNR {db:.1} dB");
        assert!(db >= MIN_PSNR_DB, "{fixture}: {db:.1} dB");
        png
    };
    check(
        generate(json!([{"name": "peft", "scale": 0.7}, {"name": "kohya", "scale": -0.5}])),
        "peft_0.7_kohya_-0.5.png",
    );
    check(
        generate(json!([{"name": "peft", "scale": 0.6}])),
        "peft_scale_0.6.png",
    );
    // Without adapters the weights are back as they were.
    check(generate(json!([])), "no_lora.png");
    let png = check(generate(json!([{"name": "peft"}])), "peft.png");
    let parameters: Value = serde_json::from_str(&png_parameters(&png).unwrap()).unwrap();
    assert_eq!(
        parameters["loras"],
        json!([{"file": "peft.safetensors", "scale": 1.0}])
    );

    generate(json!([{"name": "../lora/peft"}])).assert_error(
        400,
        "not a name",
        "a path as adapter name",
    );
    generate(json!([{"name": "notes"}])).assert_error(400, "no adapter named", "not in the folder");
    generate(json!([{"name": "not_a_lora"}])).assert_error(
        400,
        "not_a_lora",
        "a file that is no adapter",
    );
    // The failed switch left the previous adapters (peft at 1) in place.
    check(generate(json!([{"name": "peft"}])), "peft.png");
}

#[test]
fn every_bad_request_gets_a_json_4xx_and_the_server_goes_on() {
    let server = start(ServerConfig {
        limits: Limits {
            max_body_bytes: 200_000,
            max_side: 256,
            max_steps: 20,
            max_images: 2,
            max_prompt_chars: 50,
            max_upload_side: 100,
            max_upload_bytes: 50_000,
            ..Limits::default()
        },
        ..config()
    });
    let client = Client::new(server.address);
    // Within the side limit, but 90x90 RGBA at 16 bits decodes to 64.8 kB: past the memory limit.
    let deep = {
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::new(90, 90);
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgba16(img)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        assert!(bytes.len() < 2_000, "the file itself is small");
        b64(&bytes)
    };
    let image = b64(&std::fs::read(pipeline_fixture("inputs/image.png")).unwrap());
    let big = {
        let img = image::RgbImage::new(128, 64);
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        b64(&bytes)
    };
    let ok = json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 2});
    let with = |patch: Value| {
        let mut body = ok.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "no prompt",
            json!({"width": 64, "height": 64}),
            400,
            "prompt is required",
        ),
        (
            "empty prompt",
            with(json!({"prompt": "  "})),
            400,
            "prompt is empty",
        ),
        (
            "long prompt",
            with(json!({"prompt": "x".repeat(51)})),
            400,
            "the limit is 50",
        ),
        (
            "odd width",
            with(json!({"width": 63})),
            400,
            "multiple of 16",
        ),
        (
            "zero height",
            with(json!({"height": 0})),
            400,
            "multiple of 16",
        ),
        ("too wide", with(json!({"width": 512})), 400, "limit of 256"),
        ("no steps", with(json!({"steps": 0})), 400, "steps 0"),
        ("too many steps", with(json!({"steps": 21})), 400, "1..=20"),
        ("no images", with(json!({"n": 0})), 400, "n 0"),
        ("too many images", with(json!({"n": 3})), 400, "1..=2"),
        ("negative width", with(json!({"width": -64})), 422, "width"),
        ("unknown field", with(json!({"stpes": 4})), 422, "stpes"),
        (
            "seed as text",
            with(json!({"seed": "abc"})),
            400,
            "seed must be a number",
        ),
        ("negative shift", with(json!({"shift": -1.0})), 400, "shift"),
        (
            "mask alone",
            with(json!({"mask": image})),
            400,
            "needs an image",
        ),
        (
            "strength alone",
            with(json!({"strength": 0.5})),
            400,
            "only with an image",
        ),
        (
            "strength 2",
            with(json!({"image": image, "strength": 2.0})),
            400,
            "outside (0, 1]",
        ),
        (
            "bad base64",
            with(json!({"image": "%%%"})),
            400,
            "not valid base64",
        ),
        (
            "not an image",
            with(json!({"image": b64(b"hello, world")})),
            400,
            "not a PNG or JPEG",
        ),
        (
            "upload too large",
            with(json!({"image": big})),
            413,
            "larger than 100x100",
        ),
        (
            "upload that decodes too large",
            with(json!({"image": deep})),
            413,
            "0 MB decoded",
        ),
        (
            "too many adapters",
            with(
                json!({"loras": (0..9).map(|i| json!({"name": format!("a{i}")})).collect::<Vec<_>>()}),
            ),
            400,
            "at most 8 per request",
        ),
        (
            "adapters without a folder",
            with(json!({"loras": [{"name": "x"}]})),
            400,
            "no adapter named",
        ),
    ];
    for (what, body, status, needle) in &cases {
        client
            .post_json("/v1/jobs", body)
            .assert_error(*status, needle, what);
    }
    client
        .post_raw("/v1/jobs", "application/json", b"{not json".to_vec())
        .assert_error(400, "", "broken JSON");
    client
        .post_raw("/v1/jobs", "text/plain", ok.to_string().into_bytes())
        .assert_error(415, "", "wrong content type");
    // The server answers from the length alone and closes: the client may not finish sending.
    let mut stream = std::net::TcpStream::connect(server.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = write!(stream, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 300000\r\n\r\n");
    let _ = stream.write_all(&vec![b' '; 300_000]);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "body over the limit: {answer}"
    );
    assert!(
        answer.contains("\"code\":\"body_too_large\""),
        "body over the limit: {answer}"
    );
    client
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a cat", "response_format": "url"}),
        )
        .assert_error(400, "b64_json", "url responses");
    client
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a cat", "size": "big"}),
        )
        .assert_error(400, "WIDTHxHEIGHT", "bad size");
    client
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a cat", "output_format": "webp"}),
        )
        .assert_error(400, "PNG", "webp");
    client
        .post_multipart("/v1/images/edits", &[("prompt", "a cat")], &[])
        .assert_error(400, "image is required", "edits without image");
    client
        .post_multipart(
            "/v1/images/edits",
            &[("prompt", "a cat"), ("colour", "red")],
            &[],
        )
        .assert_error(400, "unknown field", "edits, unknown field");
    client
        .post_raw(
            "/v1/images/edits",
            "multipart/form-data; boundary=x",
            b"garbage".to_vec(),
        )
        .assert_error(400, "", "broken multipart");
    client
        .post_json("/sdapi/v1/img2img", &json!({"prompt": "a cat"}))
        .assert_error(400, "init_images", "img2img without image");
    client
        .get("/v1/nothing")
        .assert_error(404, "no route", "unknown route");
    client
        .get("/v1/jobs")
        .assert_error(405, "not allowed", "GET on a POST route");
    client
        .get("/v1/jobs/job-nope")
        .assert_error(404, "no job", "unknown job");
    client
        .delete("/v1/jobs/job-nope")
        .assert_error(404, "no job", "cancel an unknown job");
    client
        .get("/v1/jobs/job-nope/events")
        .assert_error(404, "no job", "events of an unknown job");
    client
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "a cat", "batch_size": usize::MAX, "n_iter": 3}),
        )
        .assert_error(400, "too large", "batch overflow");
    client
        .post_raw("/v1/images/edits", "application/json", b"{}".to_vec())
        .assert_error(400, "", "edits without multipart");
    let done = client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a cat", "width": 32, "height": 32, "steps": 1}),
        )
        .json();
    client
        .get(&format!(
            "/v1/jobs/{}/images/abc",
            done["id"].as_str().unwrap()
        ))
        .assert_error(404, "not an image number", "a non-numeric image index");

    // Still serving, and counting what it refused.
    let reply = client.post_json(
        "/v1/images/generations",
        &json!({"prompt": "a cat", "size": "32x32", "steps": 1}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let metrics = client.get("/metrics").text();
    let refused = metric(&metrics, "zimage_http_client_errors_total");
    assert!(refused >= cases.len() as f64 + 17.0, "{metrics}");
    // The job whose image index was bad, and the one just made (they ran in order).
    assert_eq!(
        metric(&metrics, "zimage_jobs_finished_total{state=\"succeeded\"}"),
        2.0
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_key_guards_the_api_but_not_the_page_or_health() {
    let server = start(ServerConfig {
        api_key: Some("s3cret".into()),
        ..config()
    });
    let mut client = Client::new(server.address);
    let reply = client.get("/v1/models");
    reply.assert_error(401, "Bearer", "no key");
    client.key = Some("wrong".into());
    client
        .get("/metrics")
        .assert_error(401, "Bearer", "wrong key");
    client
        .post_json("/v1/jobs", &json!({"prompt": "a cat"}))
        .assert_error(401, "Bearer", "wrong key, POST");
    client.key = None;
    assert_eq!(client.get("/health").json()["auth"], true);
    let page = client.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("id=\"generate\""));
    client.key = Some("s3cret".into());
    assert_eq!(client.get("/v1/models").status, 200);
    // The scheme is case-insensitive (RFC 7235).
    let lower = ureq::get(format!("{}/v1/models", client.base))
        .header("Authorization", "bearer s3cret")
        .call();
    assert_eq!(lower.map(|r| r.status().as_u16()).unwrap_or(0), 200);

    // Another address than loopback needs a key, or the explicit opt-out.
    let open = start_at("0.0.0.0:0".parse().unwrap(), config(), false);
    assert!(matches!(
        open,
        Err(zimage_server::ServerError::Unauthenticated(_))
    ));
    let keyed = start_at(
        "0.0.0.0:0".parse().unwrap(),
        ServerConfig {
            api_key: Some("k".into()),
            ..config()
        },
        false,
    );
    assert!(keyed.is_ok());
    assert!(start_at("0.0.0.0:0".parse().unwrap(), config(), true).is_ok());
}

#[test]
fn the_queue_is_bounded_and_cancelling_frees_the_slot() {
    let server = start(ServerConfig {
        limits: Limits {
            max_queue: 2,
            max_steps: 1000,
            ..Limits::default()
        },
        ..config()
    });
    let client = Client::new(server.address);
    let job = |steps: usize| {
        client.post_json(
            "/v1/jobs",
            &json!({"prompt": "a cat", "width": 32, "height": 32, "steps": steps, "seed": 1}),
        )
    };
    let long = job(1000).json();
    let long_id = long["id"].as_str().unwrap().to_string();
    wait_until(30.0, "the long job to run", || {
        client.get(&format!("/v1/jobs/{long_id}")).json()["step"].as_u64() > Some(0)
    });
    let second = job(2).json()["id"].as_str().unwrap().to_string();
    let third = job(2).json()["id"].as_str().unwrap().to_string();
    job(2).assert_error(429, "queue is full", "a third waiting job");
    assert_eq!(client.get("/health").json()["queue"]["waiting"], 2);

    // A waiting job leaves at once and frees its place.
    let cancelled = client.delete(&format!("/v1/jobs/{second}"));
    assert_eq!(cancelled.status, 202);
    assert_eq!(cancelled.json()["state"], "cancelled");
    let fourth = job(2);
    assert_eq!(fourth.status, 202, "{}", fourth.text());
    let fourth = fourth.json()["id"].as_str().unwrap().to_string();

    // The running one stops between steps.
    client.delete(&format!("/v1/jobs/{long_id}"));
    wait_until(30.0, "the long job to stop", || {
        client.get(&format!("/v1/jobs/{long_id}")).json()["state"] == "cancelled"
    });
    let stopped = client.get(&format!("/v1/jobs/{long_id}")).json();
    assert!(stopped["step"].as_u64().unwrap() < 1000, "{stopped}");
    assert!(stopped["images"].as_array().unwrap().is_empty());
    client
        .get(&format!("/v1/jobs/{long_id}/images/0"))
        .assert_error(404, "no image 0", "a cancelled job's image");

    for id in [&third, &fourth] {
        wait_until(30.0, "the queued jobs", || {
            client.get(&format!("/v1/jobs/{id}")).json()["state"] == "succeeded"
        });
    }
    let metrics = client.get("/metrics").text();
    assert_eq!(
        metric(&metrics, "zimage_jobs_finished_total{state=\"cancelled\"}"),
        2.0
    );
    assert_eq!(
        metric(&metrics, "zimage_jobs_finished_total{state=\"succeeded\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "zimage_jobs_rejected_total{reason=\"queue_full\"}"
        ),
        1.0
    );
}

#[test]
fn a_client_that_disconnects_cancels_only_its_own_job() {
    let server = start(ServerConfig {
        limits: Limits {
            max_steps: 1000,
            ..Limits::default()
        },
        ..config()
    });
    let client = Client::new(server.address);
    // A synchronous request on a raw connection, dropped while its job runs.
    let body = json!({"prompt": "a cat", "size": "32x32", "steps": 1000, "seed": 2}).to_string();
    let mut stream = std::net::TcpStream::connect(server.address).unwrap();
    write!(
        stream,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let queue = server.shared.queue.clone();
    wait_until(30.0, "the dropped request's job to run", || {
        queue.running().is_some_and(|j| j.status().step > 0)
    });
    let dropped = queue.running().unwrap();
    // Someone else's job waits behind it.
    let other = client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a dog", "width": 32, "height": 32, "steps": 2, "seed": 3}),
        )
        .json();
    let other_id = other["id"].as_str().unwrap().to_string();
    drop(stream);
    wait_until(30.0, "the dropped job to be cancelled", || {
        dropped.status().state == zimage_server::jobs::JobState::Cancelled
    });
    wait_until(30.0, "the other job", || {
        client.get(&format!("/v1/jobs/{other_id}")).json()["state"] == "succeeded"
    });

    // A client that reads half an event stream and leaves does not disturb the job either.
    let watched = client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a bird", "width": 32, "height": 32, "steps": 30, "seed": 4}),
        )
        .json();
    let watched_id = watched["id"].as_str().unwrap().to_string();
    let mut events = std::net::TcpStream::connect(server.address).unwrap();
    write!(
        events,
        "GET /v1/jobs/{watched_id}/events HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut first = [0u8; 64];
    let _ = events.read(&mut first).unwrap();
    drop(events);
    wait_until(60.0, "the watched job", || {
        client.get(&format!("/v1/jobs/{watched_id}")).json()["state"] == "succeeded"
    });
}

#[test]
fn a_bounded_load_answers_every_request_and_loses_no_job() {
    let server = start(ServerConfig {
        limits: Limits {
            max_queue: 3,
            ..Limits::default()
        },
        ..config()
    });
    let address = server.address;
    let clients = 8;
    let per_client = 6;
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || {
                    let client = Client::new(address);
                    (0..per_client)
                        .map(|i| {
                            let reply = client.post_json(
                                "/v1/images/generations",
                                &json!({"prompt": format!("client {c} image {i}"), "size": "32x32", "steps": 2, "seed": c * 100 + i}),
                            );
                            let job = (reply.status == 200).then(|| reply.json()["zimage"]["job"].as_str().unwrap().to_string());
                            assert!(matches!(reply.status, 200 | 429), "{}: {}", reply.status, reply.text());
                            (reply.status, job)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(results.len(), clients * per_client);
    let served: Vec<&String> = results.iter().filter_map(|(_, job)| job.as_ref()).collect();
    let unique: std::collections::HashSet<&&String> = served.iter().collect();
    assert_eq!(unique.len(), served.len(), "a job answered twice");
    assert!(!served.is_empty());
    let rejected = results.iter().filter(|(s, _)| *s == 429).count();
    let metrics = Client::new(address).get("/metrics").text();
    assert_eq!(
        metric(&metrics, "zimage_jobs_finished_total{state=\"succeeded\"}"),
        served.len() as f64
    );
    assert_eq!(
        metric(
            &metrics,
            "zimage_jobs_rejected_total{reason=\"queue_full\"}"
        ),
        rejected as f64
    );
    assert_eq!(
        metric(&metrics, "zimage_jobs_submitted_total"),
        served.len() as f64
    );
    println!(
        "{} requests: {} served, {rejected} refused with 429",
        results.len(),
        served.len()
    );
}

#[test]
fn controlnet_jobs_match_diffusers() {
    let dir = zimage_test_support::fixtures().join("controlnet");
    let server = start_with(
        "127.0.0.1:0".parse().unwrap(),
        config(),
        false,
        Some(dir.join("v2_1.safetensors")),
    )
    .unwrap();
    let client = Client::new(server.address);
    assert_eq!(client.get("/health").json()["controlnet"], true);
    let control = b64(&std::fs::read(dir.join("inputs/control.png")).unwrap());
    let run = |body: Value| {
        let record = client.post_json("/v1/jobs", &body);
        assert_eq!(record.status, 202, "{}", record.text());
        let id = record.json()["id"].as_str().unwrap().to_string();
        wait_until(60.0, "the ControlNet job", || {
            let state = client.get(&format!("/v1/jobs/{id}")).json()["state"].clone();
            assert_ne!(
                state,
                "failed",
                "{}",
                client.get(&format!("/v1/jobs/{id}")).text()
            );
            state == "succeeded"
        });
        client.get(&format!("/v1/jobs/{id}/images/0")).body
    };
    let check = |png: Vec<u8>, fixture: &str| {
        let db = psnr(&decode_png(&png), &load_png(&dir.join(fixture)));
        println!("ControlNet {fixture:<40} PSNR {db:.1} dB");
        assert!(db >= MIN_PSNR_DB, "{fixture}: {db:.1} dB");
    };
    // The size comes from the control image (64x64).
    check(
        run(
            json!({"prompt": "a cat holding a sign that says hello world", "control_image": control, "steps": 6, "guidance": 0.0, "seed": 42}),
        ),
        "expected/t2i_v2_1.png",
    );
    let image = b64(&std::fs::read(pipeline_fixture("inputs/image.png")).unwrap());
    let mask = b64(&std::fs::read(pipeline_fixture("inputs/mask.png")).unwrap());
    check(
        run(
            json!({"prompt": "a yellow balloon", "negative_prompt": "dark", "image": image, "mask": mask, "control_image": control,
                   "control_scale": 1.25, "width": 64, "height": 64, "steps": 4, "guidance": 2.0, "seed": 10}),
        ),
        "expected/inpaint_v2_1_scale_guidance.png",
    );
    client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a cat", "control_image": control, "image": image}),
        )
        .assert_error(400, "needs a mask", "control with an image and no mask");
    client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a cat", "control_scale": 0.5}),
        )
        .assert_error(400, "only with a control_image", "a scale without control");

    let plain = start(config());
    Client::new(plain.address)
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a cat", "control_image": control}),
        )
        .assert_error(400, "no ControlNet", "control on a server without one");
}

/// The `Access-Control-Allow-Origin` a server sends to a request from `origin`.
fn allowed_origin(address: std::net::SocketAddr, origin: &str) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let response = agent
        .get(format!("http://{address}/v1/models"))
        .header("Origin", origin)
        .call()
        .unwrap();
    response
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string())
}

#[test]
fn cors_is_off_unless_origins_are_given_and_bad_settings_stop_the_start() {
    let off = start(config());
    assert_eq!(allowed_origin(off.address, "http://example.com"), None);
    drop(off);

    let listed = start(ServerConfig {
        cors_origins: vec!["http://example.com".into()],
        ..config()
    });
    assert_eq!(
        allowed_origin(listed.address, "http://example.com").as_deref(),
        Some("http://example.com")
    );
    assert_eq!(allowed_origin(listed.address, "http://evil.test"), None);
    drop(listed);

    let any = start(ServerConfig {
        cors_origins: vec!["*".into()],
        ..config()
    });
    assert_eq!(
        allowed_origin(any.address, "http://anyone.test").as_deref(),
        Some("*")
    );
    drop(any);

    let refused = |config: ServerConfig, needle: &str| match start_at(
        "127.0.0.1:0".parse().unwrap(),
        config,
        false,
    ) {
        Err(e) => assert!(e.to_string().contains(needle), "{e}"),
        Ok(_) => panic!("started with a bad setting ({needle})"),
    };
    refused(
        ServerConfig {
            cors_origins: vec!["example.com/path".into()],
            ..config()
        },
        "is not an origin",
    );
    refused(
        ServerConfig {
            api_key: Some("  ".into()),
            ..config()
        },
        "the API key is empty",
    );
}
