# stagelens: layer-wise probing of multimodal LLMs. Entry point only; the stages live in
# workflow/rules/, the config keys in config/README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/extract.smk"


# Stages still being written by other hands join as soon as their file exists.
for _stage in ("embedded", "probe", "report"):
    if os.path.exists(os.path.join(workflow.basedir, f"workflow/rules/{_stage}.smk")):

        include: f"workflow/rules/{_stage}.smk"


rule all:
    input:
        all_targets,
    default_target: True
