-- The detection that pictures a profile: a person's decision first, then the detector's confidence, then the
-- newest. The review queue asks it for every candidate of every item, the deer list for every profile.
-- Query: best_detection_id in serve_app/store/review.py (ITEM_SQL) and serve_app/store/deer.py
CREATE INDEX IF NOT EXISTS detections_profile_picture_idx
    ON detections (deer_id, (decision = 'manual') DESC, confidence DESC NULLS LAST, created_at DESC, id DESC)
    WHERE deer_id IS NOT NULL;
