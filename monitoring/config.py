"""`MonitorConfig`: every drift check's statistic, floor and minimum window, the calibration and the alarm."""

from __future__ import annotations

from pydantic import Field

from champion.config import StrictModel


class CheckConfig(StrictModel):
    enabled: bool = True
    min_rows: int = Field(ge=1)  # below this the check says insufficient_data, never a verdict
    floor: float = Field(ge=0)  # the calibrated threshold is never below this effect size


class EmbeddingCheck(CheckConfig):
    sample_rows: int = Field(500, ge=20)  # rows per side for the encoder's embeddings (a forward pass each)


class TextCheck(CheckConfig):
    sample_rows: int = Field(1000, ge=20)  # rows per side for Evidently's domain classifier


class ConceptCheck(StrictModel):
    enabled: bool = True
    min_labels: int = Field(30, ge=5)  # labelled rows in the window needed for a verdict
    margin: float = Field(0.02, ge=0)  # drift when the whole interval lies this far below the held-out figure
    confidence: float = Field(0.99, gt=0.5, lt=1)  # the reported interval; drift when it all lies below
    resamples: int = Field(1000, ge=100)


class Checks(StrictModel):
    # The predicted-label mix: Jensen-Shannon distance (base 2); labels the version does not know count apart.
    prediction: CheckConfig = CheckConfig(min_rows=100, floor=0.05)
    # The top probability: Wasserstein distance in units of the reference's standard deviation.
    confidence: CheckConfig = CheckConfig(min_rows=100, floor=0.1)
    # Expected accuracy from calibrated confidence (CBPE-style): the drop below the reference's estimate.
    estimated_accuracy: CheckConfig = CheckConfig(min_rows=100, floor=0.03)
    # The encoder's mean-pooled embeddings: unbiased MMD^2 with an RBF kernel (median-distance bandwidth).
    embedding: EmbeddingCheck = EmbeddingCheck(min_rows=100, floor=0.002)
    # Evidently's text-content drift (a domain classifier's ROC AUC) on the raw text.
    text_content: TextCheck = TextCheck(min_rows=200, floor=0.55)
    # Token counts: Wasserstein distance in units of the reference's standard deviation.
    text_length: CheckConfig = CheckConfig(min_rows=100, floor=0.1)
    # Mean share of [UNK] tokens: the rise over the reference.
    unknown_tokens: CheckConfig = CheckConfig(min_rows=100, floor=0.01)
    # Share of texts never seen in training: the rise over the reference.
    unseen_texts: CheckConfig = CheckConfig(min_rows=100, floor=0.1)
    # Accuracy and macro-F1 of the labelled rows (feedback), against the version's held-out figures.
    concept: ConceptCheck = ConceptCheck()


class GenerationChecks(StrictModel):
    """A text-generation model's checks (monitoring/lm_drift.py); `checks.concept` applies to it too."""

    # Prompt and answer token counts: Wasserstein distance in units of the reference's standard deviation.
    prompt_length: CheckConfig = CheckConfig(min_rows=100, floor=0.1)
    answer_length: CheckConfig = CheckConfig(min_rows=100, floor=0.1)
    # The mix of intents the JSON answers name ("" for none): Jensen-Shannon distance (base 2).
    intent_mix: CheckConfig = CheckConfig(min_rows=100, floor=0.05)
    # The drop in the share of answers that are a JSON object (a performance signal).
    valid_json: CheckConfig = CheckConfig(min_rows=100, floor=0.02)
    # The drop in the mean log-probability of the answers' own tokens (a label-free performance signal).
    answer_logprob: CheckConfig = CheckConfig(min_rows=100, floor=0.02)


class Calibration(StrictModel):
    # Target share of iid windows whose decision is `drift`, split evenly over the enabled checks.
    false_alarm_rate: float = Field(0.01, gt=0, lt=0.5)
    resamples: int = Field(1000, ge=50)  # null windows for the cheap statistics
    embedding_resamples: int = Field(300, ge=20)  # null windows for the MMD (its kernel is computed once)
    max_window_rows: int = Field(20_000, ge=100)  # larger windows are calibrated at this size (conservative)
    seed: int = 0


class Alarm(StrictModel):
    # The drift state that may trigger anything: at least `k` of the last `n` stored windows drifted.
    k: int = Field(2, ge=1)
    n: int = Field(3, ge=1)


class Report(StrictModel):
    mlflow: bool = True  # log the Evidently HTML and JSON report to MLflow against the served version
    experiment: str = "champion-monitoring"


class MonitorConfig(StrictModel):
    checks: Checks = Checks()
    generation: GenerationChecks = GenerationChecks()  # a text-generation model's checks, instead of `checks`
    calibration: Calibration = Calibration()
    alarm: Alarm = Alarm()
    report: Report = Report()
    store_url: str | None = None  # drift_checks table; default: beside the inference log
    max_rows: int = Field(200_000, ge=100)  # a larger window is sampled to this many rows (and says so)
