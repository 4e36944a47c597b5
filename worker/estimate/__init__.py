"""`ftw estimate`: peak GPU memory, tokens/s, time and cost of a run before it starts (docs/estimate.md).

    shapes.py       the base model's dimensions: a local config.json, a table of common Hub models, the Hub;
                    what a LoRA adapter on them counts
    data_tokens.py  the training data's token count: a matching prepared cache, else estimated from the files
    model.py        the calibrated model: peak memory and seconds per micro-batch of a Workload
    gpus.py         RunPod's serverless GPU types (runpod_gpus.toml: memory, price per second, bf16 peak)
    devices.py      the GPUs a job got, as the checks' probe found them (records only)
    report.py       one config on every GPU type: fits, time, cost, the cheapest, advice
    cli.py          `ftw estimate`
    job.py          the job path: the checks' refusal (allow_oom_risk) and the result's cost metrics
    calibration.py  the measured GPU rows of docs/benchmarks.md the model is fitted to and tested on

Nothing here imports torch or the orchestrator (worker/checks uses it, not the reverse): the
orchestrator and the CLI run it on the CPU in about a second.
"""
