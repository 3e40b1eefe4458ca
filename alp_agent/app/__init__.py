"""The application layer: commands (cli), the job's composition (job), eval, repro, report, progress and the GPU check.
It composes the layers below (sandbox -> envs -> rollout -> train, engine) and is imported by none of them."""
