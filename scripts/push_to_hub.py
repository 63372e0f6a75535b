"""Publish an ASCL model on the Hugging Face Hub as a feature extractor.

    python scripts/push_to_hub.py --model_dir outputs/quickstart/final --hub_model_id your-org/ascl-resnet18

`--model_dir` is either an exported folder (what `scripts/pretrain.py` writes to <output_dir>/final, or
`ascl_hf.hub.export_model`) or a plain `save_pretrained` folder of an AsclModel, which is exported first into
--output_dir (default: <model_dir>-hub). The token comes from --token, else HF_TOKEN or `hf auth login`.
Exits with status 1 and a retry command when the upload fails; the local folder is left as it was.
"""

import argparse
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import AutoImageProcessor

from ascl_hf import AsclModel
from ascl_hf.augment import IMAGENET_MEAN, IMAGENET_STD
from ascl_hf.evaluation import load_results
from ascl_hf.hub import HubPushError, export_model, is_exported_folder, push_to_hub


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="exported folder, or an AsclModel save_pretrained folder")
    parser.add_argument("--hub_model_id", required=True, help="repository id, e.g. your-org/ascl-resnet18")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created when missing)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    export = parser.add_argument_group("export (only when --model_dir is not an exported folder yet)")
    export.add_argument("--output_dir", default=None, help="where to export (default: <model_dir>-hub)")
    export.add_argument("--image_size", type=int, default=None,
                        help="input size (default: from the folder's preprocessor_config.json, else 224)")
    export.add_argument("--results", default=None, help="results JSON from scripts/evaluate.py, shown on the card")
    export.add_argument("--embedding_plot", default=None, help="PNG shown on the card (e.g. embedding_map.png)")
    export.add_argument("--export_backbone", action="store_true",
                        help="export the backbone alone as a plain transformers checkpoint (ImageNet stem only)")
    return parser.parse_args(argv)


def export_first(arguments: argparse.Namespace) -> Path:
    """Exports a save_pretrained folder, taking size and normalisation from its image processor when it has one."""
    model_dir = Path(arguments.model_dir)
    model = AsclModel.from_pretrained(model_dir).eval()
    image_size, image_mean, image_std = arguments.image_size or 224, list(IMAGENET_MEAN), list(IMAGENET_STD)
    if (model_dir / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(model_dir)
        image_size = arguments.image_size or processor.size["height"]
        image_mean, image_std = processor.image_mean, processor.image_std
    output_dir = Path(arguments.output_dir or f"{str(model_dir).rstrip('/')}-hub")
    results = load_results(arguments.results)["records"] if arguments.results else None
    return export_model(
        model,
        output_dir,
        image_size=image_size,
        image_mean=image_mean,
        image_std=image_std,
        card_data={"model_id": arguments.hub_model_id},
        results=results,
        embedding_plot=arguments.embedding_plot,
        export_backbone=arguments.export_backbone,
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    folder = Path(arguments.model_dir)
    if not folder.is_dir():
        print(f"error: --model_dir {folder} is not a directory.", file=sys.stderr)
        return 1
    try:
        if not is_exported_folder(folder):
            folder = export_first(arguments)
            print(f"Exported {arguments.model_dir} to {folder}")
        elif arguments.hub_model_id not in ModelCard.load(folder / "README.md").text:
            print(f"note: the card in {folder} names another model id in its snippets; re-export with "
                  f"card_data={{'model_id': '{arguments.hub_model_id}'}} to update it.")
        url = push_to_hub(folder, arguments.hub_model_id, private=arguments.private, revision=arguments.revision,
                          token=arguments.token)
    except (HubPushError, FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
