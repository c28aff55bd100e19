#!/usr/bin/env bash
# Generate the Cityscapes label images Detectron2's loaders need, with cityscapesscripts:
#   *_gtFine_labelTrainIds.png   (semantic segmentation; always)
#   gtFine/cityscapes_panoptic_{train,val}[.json]   (panoptic; only with --panoptic)
# Instance segmentation needs neither: it reads the *_gtFine_polygons.json files directly.
#
# usage: bash datasets/prepare_cityscapes.sh [--panoptic] [CITYSCAPES_ROOT]
#   CITYSCAPES_ROOT defaults to $DETECTRON2_DATASETS/cityscapes ($DETECTRON2_DATASETS defaults to ./datasets).
#   The Python used is $PYTHON, else the repository's .venv, else python3; it needs cityscapesscripts.
set -euo pipefail

panoptic=0
root=""
for arg in "$@"; do
  case "$arg" in
    --panoptic) panoptic=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "prepare_cityscapes: unknown option $arg" >&2; exit 2 ;;
    *) root="$arg" ;;
  esac
done
root=${root:-${DETECTRON2_DATASETS:-datasets}/cityscapes}

if [ ! -d "$root/gtFine" ]; then
  echo "prepare_cityscapes: $root/gtFine does not exist." >&2
  echo "  Expected \$DETECTRON2_DATASETS/cityscapes/{gtFine,leftImg8bit}/{train,val,test}/<city>/..." >&2
  echo "  (DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-<unset, ./datasets>}); see datasets/README.md." >&2
  exit 1
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
if ! "$py" -c 'import cityscapesscripts' >/dev/null 2>&1; then
  echo "prepare_cityscapes: $py cannot import cityscapesscripts; run 'make setup' or 'pip install cityscapesscripts'." >&2
  exit 1
fi

export CITYSCAPES_DATASET
CITYSCAPES_DATASET=$(cd "$root" && pwd)
echo "prepare_cityscapes: CITYSCAPES_DATASET=$CITYSCAPES_DATASET"
"$py" -m cityscapesscripts.preparation.createTrainIdLabelImgs
echo
if [ "$panoptic" = 1 ]; then
  "$py" -m cityscapesscripts.preparation.createPanopticImgs
fi
echo "prepare_cityscapes: done"
