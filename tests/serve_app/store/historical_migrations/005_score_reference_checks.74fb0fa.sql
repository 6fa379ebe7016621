-- The similarity log checks its references once per statement instead of once per row.
--
-- A foreign key runs one lookup and takes one row lock per inserted row: with 50 profiles that is
-- 100 lookups per detection, about half the cost of a score COPY. The triggers below keep the same
-- guarantees per statement, over the distinct ids of a whole COPY or INSERT:
-- * the referenced detections and deer rows are locked FOR KEY SHARE, as a foreign key does, so a
--   concurrent delete waits for the writer to commit (and then deletes its rows too), or the writer
--   sees the delete;
-- * a missing detection or deer refuses the statement with SQLSTATE 23503 (foreign_key_violation);
-- * deleting a detection or a deer deletes its scores (ON DELETE CASCADE), and so does TRUNCATE;
-- * a referenced id cannot change (ON UPDATE NO ACTION).
ALTER TABLE reid_similarity_scores
    DROP CONSTRAINT reid_similarity_scores_detection_id_fkey,
    DROP CONSTRAINT reid_similarity_scores_deer_id_fkey;

CREATE FUNCTION reid_scores_check_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_detections bigint[];
    v_deer bigint[];
    v_missing bigint;
BEGIN
    SELECT array_agg(DISTINCT detection_id), array_agg(DISTINCT deer_id) INTO v_detections, v_deer FROM new_rows;
    IF v_detections IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM detections d WHERE d.id = ANY (v_detections) ORDER BY d.id FOR KEY SHARE OF d;
    PERFORM 1 FROM deer e WHERE e.id = ANY (v_deer) ORDER BY e.id FOR KEY SHARE OF e;
    SELECT m.id INTO v_missing FROM unnest(v_detections) AS m(id)
        WHERE NOT EXISTS (SELECT 1 FROM detections d WHERE d.id = m.id) LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('score rows reference detection %s, which does not exist', v_missing),
            TABLE = 'reid_similarity_scores', COLUMN = 'detection_id';
    END IF;
    SELECT m.id INTO v_missing FROM unnest(v_deer) AS m(id)
        WHERE NOT EXISTS (SELECT 1 FROM deer e WHERE e.id = m.id) LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('score rows reference deer %s, which does not exist', v_missing),
            TABLE = 'reid_similarity_scores', COLUMN = 'deer_id';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER reid_scores_references_on_insert
    AFTER INSERT ON reid_similarity_scores REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_check_references();
CREATE TRIGGER reid_scores_references_on_update
    AFTER UPDATE ON reid_similarity_scores REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_check_references();

CREATE FUNCTION reid_scores_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'detections' THEN
        DELETE FROM reid_similarity_scores s USING old_rows o WHERE s.detection_id = o.id;
    ELSE
        DELETE FROM reid_similarity_scores s USING old_rows o WHERE s.deer_id = o.id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER reid_scores_cascade
    AFTER DELETE ON detections REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_cascade();
CREATE TRIGGER reid_scores_cascade
    AFTER DELETE ON deer REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_cascade();

CREATE FUNCTION reid_scores_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE reid_similarity_scores;
    RETURN NULL;
EXCEPTION WHEN object_in_use THEN
    -- The same TRUNCATE names the scores too (it emptied them already, or is about to).
    DELETE FROM reid_similarity_scores;
    RETURN NULL;
END;
$$;

CREATE TRIGGER reid_scores_cascade_truncate
    AFTER TRUNCATE ON detections FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_truncate();
CREATE TRIGGER reid_scores_cascade_truncate
    AFTER TRUNCATE ON deer FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_truncate();

CREATE FUNCTION reid_scores_keep_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'detections' THEN
        PERFORM 1 FROM reid_similarity_scores s WHERE s.detection_id = OLD.id LIMIT 1;
    ELSE
        PERFORM 1 FROM reid_similarity_scores s WHERE s.deer_id = OLD.id LIMIT 1;
    END IF;
    IF FOUND THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('%s %s has score rows; its id cannot change', TG_TABLE_NAME, OLD.id),
            TABLE = TG_TABLE_NAME, COLUMN = 'id';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER reid_scores_keep_keys
    AFTER UPDATE OF id ON detections FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION reid_scores_keep_keys();
CREATE TRIGGER reid_scores_keep_keys
    AFTER UPDATE OF id ON deer FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION reid_scores_keep_keys();

-- Scores are appended in time order, so a block-range index answers time windows at a fraction of a
-- B-tree's cost per inserted row.
DROP INDEX reid_scores_computed_at_idx;
-- Query: time windows (assignment rate over time, retention/partition maintenance).
CREATE INDEX reid_scores_computed_at_idx ON reid_similarity_scores USING brin (computed_at);
