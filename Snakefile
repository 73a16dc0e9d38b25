# stagelens: layer-wise probing of multimodal LLMs. Entry point only; the stages live in
# workflow/rules/, the config keys in config/README.md.
from snakemake.utils import min_version

min_version("9.0")


# A --configfile replaces the default rather than merging into it (a merge would carry the
# default's models into every other run); --config KEY=VALUE alone still edits the default.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/embedded.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
