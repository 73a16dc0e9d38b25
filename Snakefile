# stagelens: layer-wise probing of multimodal LLMs. Entry point only; the stages live in
# workflow/rules/, the config keys in config/README.md.
import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# stagelens comes from this checkout whether or not it is pip-installed: here, and through
# PYTHONPATH in every job's script (also inside --sdm conda environments and on cluster nodes).
_STAGELENS_SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, _STAGELENS_SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_STAGELENS_SRC, os.environ.get("PYTHONPATH")) if p))


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
