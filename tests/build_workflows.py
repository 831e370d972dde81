"""`make workflows`: writes example_workflows/<name>.json (UI format) and
tests/workflows/<name>_api.json (its API twin with the test overrides) from
tests/workflow_graphs.py, using the node definitions of the in-process ComfyUI + this pack."""
import asyncio
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import conftest  # noqa: E402  (imports ComfyUI in-process and loads the pack)
import nodes  # noqa: E402
import workflow_graphs as graphs  # noqa: E402


def object_info() -> dict:
    """What GET /object_info answers, for the fields the workflows need."""
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False))
    out = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        types = cls.INPUT_TYPES()
        out[name] = {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "output": list(cls.RETURN_TYPES),
                     "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                     "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name)}
    return json.loads(json.dumps(out, default=str))


def main():
    info = object_info()
    for workflow in graphs.WORKFLOWS + graphs.TODAY_WORKFLOWS + graphs.TRAINING_WORKFLOWS + graphs.SAM3_WORKFLOWS:
        gap = graphs.version_gap(workflow, info)
        if gap:
            print("skipped:", gap)
            continue
        ui = graphs.build_ui(workflow, info)
        (conftest.REPO / "example_workflows" / f"{workflow.name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        api = graphs.ui_to_api(ui, info, workflow.test_overrides)
        (conftest.REPO / "tests" / "workflows" / f"{workflow.name}_api.json").write_text(json.dumps(api, indent=1) + "\n")
        print("wrote", workflow.name)


if __name__ == "__main__":
    try:
        main()
    finally:
        import shutil
        shutil.rmtree(conftest.BASE, ignore_errors=True)   # pytest's session hook does this in tests
