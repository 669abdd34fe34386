//! `zimage serve` as users run it: the same image and PNG parameters as `zimage generate` from
//! the same seed, a clear refusal of an open address without a key, and the web page driven in
//! headless Chromium (Debian's chromium and chromium-driver; `.ci/run` installs them and sets
//! ZIMAGE_REQUIRE_BROWSER=1, so that CI never skips it).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zimage_test_support::pipeline::model_folder;
use zimage_test_support::scratch;

/// A `zimage serve` process, killed when dropped.
struct Served {
    child: Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Served {
    let model = model_folder();
    let mut child = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "serve",
            "--model",
            &model.display().to_string(),
            "--backend",
            "ndarray",
            "--port",
            "0",
            "--resident-size",
            "64",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start zimage serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("zimage serve printed {line:?}"))
        .to_string();
    Served { child, base }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn get_json(agent: &ureq::Agent, url: &str) -> Value {
    agent
        .get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

fn post_json(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    let mut response = agent.post(url).send_json(body).unwrap();
    (
        response.status().as_u16(),
        response.body_mut().read_json().unwrap(),
    )
}

fn png_parameters(bytes: &[u8]) -> Value {
    serde_json::from_str(&zimage_pipeline::record::png_parameters(bytes).expect("parameters chunk"))
        .unwrap()
}

#[test]
fn serve_makes_the_image_generate_makes() {
    let served = serve(&[]);
    let agent = agent();
    let health = get_json(&agent, &format!("{}/health", served.base));
    assert_eq!(health["status"], "ok");
    assert_eq!(health["resident"], true);

    let request = json!({"prompt": "a cat holding a sign that says hello world", "negative_prompt": "blurry, low quality, watermark",
                          "width": 64, "height": 64, "steps": 6, "guidance": 3.0, "cfg_normalization": 1.0, "cfg_truncation": 0.6, "seed": 7});
    let (status, record) = post_json(&agent, &format!("{}/v1/jobs", served.base), &request);
    assert_eq!(status, 202, "{record}");
    let id = record["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let record = get_json(&agent, &format!("{}/v1/jobs/{id}", served.base));
        if record["state"] == "succeeded" || Instant::now() > deadline {
            break record;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(record["state"], "succeeded", "{record}");
    let served_png = agent
        .get(format!(
            "{}{}",
            served.base,
            record["images"][0].as_str().unwrap()
        ))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();

    let out = scratch("serve-vs-generate").join("generated.png");
    let model = model_folder();
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "generate",
            "--model",
            &model.display().to_string(),
            "--backend",
            "ndarray",
            "--quiet",
        ])
        .args([
            "--prompt",
            "a cat holding a sign that says hello world",
            "--negative-prompt",
            "blurry, low quality, watermark",
        ])
        .args([
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "6",
            "--guidance",
            "3",
            "--cfg-normalization",
            "1",
            "--cfg-truncation",
            "0.6",
            "--seed",
            "7",
        ])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let generated_png = std::fs::read(&out).unwrap();
    let decode = |bytes: &[u8]| image::load_from_memory(bytes).unwrap().to_rgb8();
    assert!(
        decode(&served_png) == decode(&generated_png),
        "the server's pixels differ from zimage generate's"
    );
    assert_eq!(png_parameters(&served_png), png_parameters(&generated_png));
}

#[test]
fn an_open_address_without_a_key_is_refused_in_one_line() {
    let model = model_folder();
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "serve",
            "--model",
            &model.display().to_string(),
            "--backend",
            "ndarray",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .env_remove("ZIMAGE_API_KEY")
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("--api-key"),
        "{stderr}"
    );
    assert!(run.stdout.is_empty(), "nothing listened");
}

/// A minimal WebDriver client (the W3C protocol is JSON over HTTP).
struct Browser {
    driver: Child,
    agent: ureq::Agent,
    session: String,
    base: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(chromium: &Path, chromedriver: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let agent = agent();
        let start = Instant::now();
        while agent.get(format!("{base}/status")).call().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut browser = Self {
            driver,
            agent,
            session: String::new(),
            base,
        };
        let session = browser.command(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1000"]}}}}),
        );
        browser.session = session["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        browser
    }

    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let mut response = match method {
            "POST" => self.agent.post(url).send_json(&body),
            "DELETE" => self.agent.delete(url).call(),
            _ => self.agent.get(url).call(),
        }
        .expect("webdriver");
        let value: Value = response.body_mut().read_json().expect("webdriver JSON");
        assert!(
            value["value"]["error"].is_null(),
            "{method} {path}: {value}"
        );
        value["value"].clone()
    }

    fn session(&self, method: &str, path: &str, body: Value) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    fn element(&self, css: &str) -> String {
        let found = self.session(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        found[ELEMENT].as_str().expect("element").to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.session("POST", &format!("/element/{element}/clear"), json!({}));
        self.session(
            "POST",
            &format!("/element/{element}/value"),
            json!({"text": text}),
        );
    }

    fn click(&self, css: &str) {
        let element = self.element(css);
        self.session("POST", &format!("/element/{element}/click"), json!({}));
    }

    fn script(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn browser_paths() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let find = |names: &[&str]| {
        names
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .map(Path::to_path_buf)
    };
    let chromium = find(&[
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]);
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ if std::env::var_os("ZIMAGE_REQUIRE_BROWSER").is_some_and(|v| v == "1") => {
            panic!("ZIMAGE_REQUIRE_BROWSER=1 but chromium and chromedriver are not installed")
        }
        _ => None,
    }
}

#[test]
fn the_web_page_makes_an_image_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser_paths() else {
        eprintln!(
            "skipped: no chromium and chromedriver (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let served = serve(&["--max-steps", "2000"]);
    let agent = agent();
    let browser = Browser::start(&chromium, &chromedriver);
    browser.session("POST", "/url", json!({"url": format!("{}/", served.base)}));
    let start = Instant::now();
    while browser
        .script("return document.getElementById('model').textContent")
        .as_str()
        .is_some_and(|t| t.contains("connecting"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the page never reached /health"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A long job holds the worker, so that the page's job is watched from its first step.
    let (_, blocker) = post_json(
        &agent,
        &format!("{}/v1/jobs", served.base),
        &json!({"prompt": "a wall", "width": 64, "height": 64, "steps": 2000}),
    );
    let blocker = blocker["id"].as_str().unwrap().to_string();

    browser.type_into("#prompt", "a cat holding a sign that says hello world");
    browser.script("const s = document.getElementById('size'); s.value = 'custom'; s.dispatchEvent(new Event('change'));");
    browser.type_into("#width", "64");
    browser.type_into("#height", "48");
    browser.type_into("#steps", "6");
    browser.click("#random-seed");
    browser.type_into("#seed", "11");
    browser.click("#generate");

    let wait_for = |what: &str, script: &str| {
        let start = Instant::now();
        loop {
            let value = browser.script(script);
            if value.as_bool() == Some(true) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(90), "timed out waiting for {what}: {}", browser.script("return JSON.stringify(window.zimageLog) + ' ' + document.getElementById('error').textContent"));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(
        "the page to submit",
        "return window.zimageLog.some(e => e.event === 'submitted')",
    );
    std::thread::sleep(Duration::from_millis(500));
    agent
        .delete(format!("{}/v1/jobs/{blocker}", served.base))
        .call()
        .unwrap();
    wait_for(
        "the image in the gallery",
        "return window.zimageLog.some(e => e.event === 'gallery')",
    );

    let log = browser.script("return window.zimageLog");
    let steps: Vec<u64> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "progress")
        .map(|e| {
            assert_eq!(e["preview"], true, "a preview with every step");
            e["step"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "{log}");
    let size = browser.script(
        "const img = document.querySelector('#gallery img'); return img && img.complete ? [img.naturalWidth, img.naturalHeight] : null",
    );
    assert_eq!(size, json!([64, 48]));
    assert_eq!(
        browser.script("return document.getElementById('progress-text').textContent"),
        "done"
    );
    let parameters = browser.script("return document.querySelector('#gallery pre').textContent");
    let parameters: Value = serde_json::from_str(parameters.as_str().unwrap()).unwrap();
    assert_eq!(parameters["seed"], 11);
    assert_eq!(parameters["steps"], 6);
    assert!(browser
        .script("return document.querySelector('#gallery a').download")
        .as_str()
        .unwrap()
        .ends_with(".png"));

    // What the page looked like, for whoever reads the test's output.
    let shot = browser.session("GET", "/screenshot", json!({}));
    let png = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap())
            .unwrap()
    };
    let path = scratch("web-page").join("page.png");
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

/// As `zimage generate` does, `zimage serve` holds weights stored in f32 in bf16 when, as stored,
/// they would not fit even loaded per job; the server says so and serves.
#[test]
fn f32_weights_that_do_not_fit_are_served_in_bf16() {
    use burn::tensor::DType;
    use zimage_nn::Precision;
    use zimage_pipeline::{ModelFiles, ZImagePipeline};
    use zimage_test_support::{read_checkpoint, write_safetensors, B};

    let dir = scratch("serve-bf16");
    // The tiny folder with its (bf16) text encoder widened to f32, exactly.
    let folder = dir.join("f32-model");
    zimage_test_support::pipeline::copy_dir(&model_folder(), &folder);
    let weights = folder.join("text_encoder");
    let tensors = read_checkpoint(&weights);
    for entry in std::fs::read_dir(&weights).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains(".safetensors") {
            std::fs::remove_file(path).unwrap();
        }
    }
    write_safetensors(&weights.join("model.safetensors"), &tensors, None);

    // The budget: room for the staged run in bf16, not for it as stored (at the resident size).
    let staged = |precision: Precision| {
        let files = ModelFiles::open(&folder).unwrap();
        let pipeline = ZImagePipeline::<B>::new(files, &Default::default(), precision)
            .unwrap()
            .keep_models(false);
        let mut options = pipeline.options("");
        (options.width, options.height) = (64, 64);
        pipeline.estimate_memory(&options).unwrap().peak()
    };
    let as_stored = staged(DType::F32.into());
    let narrowed = staged(Precision::from(DType::F32).with_weights(Some(DType::BF16)));
    assert!(narrowed < as_stored, "{narrowed} vs {as_stored}");
    let budget = ((as_stored + narrowed) / 2).to_string();

    let mut child = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args(["serve", "--model", &folder.display().to_string()])
        .args([
            "--backend",
            "ndarray",
            "--port",
            "0",
            "--resident-size",
            "64",
        ])
        .env("ZIMAGE_AVAILABLE_MEMORY", &budget)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start zimage serve");
    // Read every line (the server must never find its stderr closed), passing on the first
    // that tells.
    let stderr = child.stderr.take().unwrap();
    let (tell, told) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("holding the weights in bf16") || line.starts_with("error") {
                let _ = tell.send(line);
            }
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let served = Served {
        base: line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("zimage serve printed {line:?}"))
            .to_string(),
        child,
    };
    let said = told.recv_timeout(Duration::from_secs(30)).ok();
    assert!(
        said.as_deref()
            .is_some_and(|l| l.starts_with("holding the weights in bf16")),
        "{said:?}"
    );
    let agent = agent();
    let (status, record) = post_json(
        &agent,
        &format!("{}/v1/images/generations", served.base),
        &json!({"prompt": "a cat", "size": "64x64", "steps": 2, "seed": 1}),
    );
    assert_eq!(status, 200, "{record}");
    assert!(record["data"][0]["b64_json"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
}
