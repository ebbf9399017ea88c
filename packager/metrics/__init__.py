"""Accuracy arithmetic: COCO mAP (pycocotools), paired-bootstrap intervals, INT8 MAC coverage."""
