//! The model at work at the site, as an operator runs it.
//! `sangsaeng-participant predict`: a model folder (weights and the plan with
//! its federated scaling), a CSV export, the predictions file and the
//! throughput line; and the refusals, which name the column or row and leave
//! no output behind. `sangsaeng-participant personalise`: the comparison table
//! and the personalised model, with nothing sent anywhere.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use sangsaeng_common::config::plan::{Scaling, TrainingPlan};
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::transfer::weights;

fn model_folder(dir: &Path) -> TrainingPlan {
    let mut plan = TrainingPlan::from_toml(
        "[schema]\nfeature_columns = [\"temp\", \"pressure\"]\nlabel_column = \"fault\"\nclasses = [\"ok\", \"jam\"]\n\
         [model]\nhidden_layers = [4]\n[training]\nrounds = 1\nlearning_rate = 0.1\nmin_participants = 1\n",
        "plan",
    )
    .unwrap();
    plan.scaling = Some(Scaling {
        mean: vec![20.0, 1.0],
        std: vec![5.0, 0.5],
        ..Default::default()
    });
    let spec = ModelSpec::from_plan(&plan);
    std::fs::write(dir.join("plan.toml"), plan.to_toml()).unwrap();
    weights::save_safetensors(
        &dir.join("global.safetensors"),
        &spec.layout(),
        &spec.init_params(1),
        HashMap::new(),
    )
    .unwrap();
    plan
}

fn predict(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sangsaeng-participant"))
        .arg("predict")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn predict_scores_a_csv_into_a_file_and_refuses_what_does_not_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    model_folder(&model);
    let input = dir.path().join("line.csv");
    std::fs::write(&input, "temp,pressure\n21.5,1.2\n35,0.4\n19,1.0\n").unwrap();
    let m = model.to_str().unwrap();
    let out = predict(&["--model", m, "--input", input.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("3 rows scored in") && stdout.contains("rows/s"),
        "{stdout}"
    );
    let written = std::fs::read_to_string(dir.path().join("line.predictions.csv")).unwrap();
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines[0], "prediction,p_ok,p_jam");
    assert_eq!(lines.len(), 4);
    for l in &lines[1..] {
        let c: Vec<&str> = l.split(',').collect();
        assert!(c[0] == "ok" || c[0] == "jam", "{l}");
        let (a, b): (f64, f64) = (c[1].parse().unwrap(), c[2].parse().unwrap());
        assert!((a + b - 1.0).abs() < 1e-5, "{l}");
        assert_eq!(c[0] == "ok", a >= b, "{l}");
    }

    // A labelled file is scored against its labels too.
    let labelled = dir.path().join("labelled.csv");
    std::fs::write(&labelled, "temp,pressure,fault\n21.5,1.2,ok\n35,0.4,jam\n").unwrap();
    let scored = dir.path().join("scored.csv");
    let out = predict(&[
        "--model",
        m,
        "--input",
        labelled.to_str().unwrap(),
        "--out",
        scored.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("against the file's labels: accuracy"));

    for (text, needle) in [
        (
            "pressure,temp\n1,2\n",
            "column 1 is 'pressure', but the model's column 1 is 'temp'",
        ),
        (
            "temp\n1\n",
            "lacks the model's feature column(s) 'pressure'",
        ),
        (
            "temp,pressure,line\n1,2,3\n",
            "column 3 ('line') is not one of the model's",
        ),
        ("temp,pressure\n1,2\n3,NaN\n", "line 3, column 'pressure'"),
    ] {
        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, text).unwrap();
        let target = dir.path().join("bad-out.csv");
        let out = predict(&[
            "--model",
            m,
            "--input",
            bad.to_str().unwrap(),
            "--out",
            target.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was accepted");
        assert!(stderr.contains(needle), "{text:?}: {stderr}");
        assert!(!target.exists(), "{text:?} left output behind");
    }

    // A folder without a plan is refused with what is missing.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = predict(&[
        "--model",
        empty.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no global.safetensors or model.safetensors"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn personalise_fine_tunes_at_the_site_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    model_folder(&model);
    let before = std::fs::read(model.join("global.safetensors")).unwrap();
    // Two well-separated classes: hot and low pressure means a jam.
    let mut csv = String::from("temp,pressure,fault\n");
    for i in 0..200 {
        let jam = i % 3 == 0;
        let (t, p) = if jam { (30.0, 0.5) } else { (18.0, 1.3) };
        let wiggle = (i % 7) as f64 * 0.1;
        csv.push_str(&format!(
            "{},{},{}\n",
            t + wiggle,
            p - wiggle / 10.0,
            if jam { "jam" } else { "ok" }
        ));
    }
    std::fs::write(dir.path().join("line.csv"), csv).unwrap();
    let sent = dir.path().join("sent");
    std::fs::create_dir_all(&sent).unwrap();
    std::fs::write(sent.join("earlier-delta.safetensors"), b"kept as it was").unwrap();
    // The coordinator's address is a closed port: personalising must not need it.
    std::fs::write(
        dir.path().join("participant.toml"),
        "coordinator = \"https://127.0.0.1:1\"\nrecord_dir = \"sent\"\nmodel_dir = \"model\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\
         [data]\nfiles = [\"line.csv\"]\nlabel_column = \"fault\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sangsaeng-participant"))
        .args(["personalise", "--epochs", "10", "--model"])
        .arg(&model)
        .arg("--config")
        .arg(dir.path().join("participant.toml"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| local only |",
        "| global (federated) |",
        "| personalised |",
    ] {
        assert!(stdout.contains(row), "{stdout}");
    }
    let f1 = |row: &str| -> f64 {
        let line = stdout.lines().find(|l| l.starts_with(row)).unwrap();
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    assert!(
        f1("| personalised |") > f1("| global (federated) |"),
        "fine-tuning an untrained model on separable rows helps: {stdout}"
    );
    assert!(model.join("personalised.safetensors").exists());
    assert_eq!(
        std::fs::read(model.join("global.safetensors")).unwrap(),
        before
    );
    let sent_now: Vec<_> = std::fs::read_dir(&sent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        sent_now,
        vec![std::ffi::OsString::from("earlier-delta.safetensors")]
    );
    assert_eq!(
        std::fs::read(sent.join("earlier-delta.safetensors")).unwrap(),
        b"kept as it was"
    );
}

/// Issue 22: a regression model's predictions come back in the target's own
/// units (the model predicts the standardised target), and a file carrying
/// the target column is scored with MAE, RMSE and R².
#[test]
fn a_regression_model_predicts_in_the_targets_units_and_scores_a_file_with_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let mut plan = TrainingPlan::from_toml(
        "[schema]\ntask = \"regression\"\nfeature_columns = [\"temp\", \"pressure\"]\ntarget_column = \"quality\"\n\
         [model]\nhidden_layers = []\n[training]\nrounds = 1\nlearning_rate = 0.1\nmin_participants = 1\n",
        "plan",
    )
    .unwrap();
    plan.scaling = Some(Scaling {
        mean: vec![20.0, 1.0],
        std: vec![5.0, 0.5],
        target_mean: Some(100.0),
        target_std: Some(10.0),
    });
    std::fs::write(model.join("plan.toml"), plan.to_toml()).unwrap();
    // A linear model that outputs the standardised temperature: weight [1, 0], bias 0.
    let spec = ModelSpec::from_plan(&plan);
    weights::save_safetensors(
        &model.join("global.safetensors"),
        &spec.layout(),
        &[1.0, 0.0, 0.0],
        HashMap::new(),
    )
    .unwrap();
    let input = dir.path().join("line.csv");
    std::fs::write(&input, "temp,pressure,quality\n25,1,110\n15,1.5,90\n").unwrap();
    let written = dir.path().join("out.csv");
    let out = predict(&[
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        written.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // temp 25 is +1 std: 100 + 1 × 10; temp 15 is −1 std: 90.
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "prediction\n110\n90\n"
    );
    assert!(
        stdout.contains("against the file's target: MAE 0.0000, RMSE 0.0000, R² 1.0000"),
        "{stdout}"
    );
}
