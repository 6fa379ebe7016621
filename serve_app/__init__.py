"""trailcam-reid: re-identification of individual deer in trail-camera detections."""
