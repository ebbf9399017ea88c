"""User datasets in Ultralytics' layout: a data.yaml, its splits, YOLO txt labels as an in-memory COCO ground truth."""
