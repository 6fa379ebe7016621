-- One schema for every database, whatever earlier main migrated it; review audit rows that outlive what
-- they describe; which model made each stored embedding.

-- 1. Databases migrated before 005 and 006 were edited in place.
--
-- 005 shipped in 60f190e and was rewritten in 74fb0fa and eccc1ee; 006 shipped as 006_site_delete_bumps.sql
-- and ff89717 renamed it and added the deferrable checks under the same number. A database that had applied
-- an earlier text kept it, because the runner goes by number. Every statement below is idempotent: on a
-- database migrated from today's files it changes nothing.
CREATE OR REPLACE FUNCTION reid_scores_require(p_table text, p_noun text, p_column text, p_ids bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_locked bigint;
    v_missing bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %I t WHERE t.id = ANY ($1) ORDER BY t.id'
                   ' FOR KEY SHARE OF t) locked', p_table) INTO v_locked USING p_ids;
    IF v_locked < cardinality(p_ids) THEN
        EXECUTE format('SELECT m.id FROM unnest($1) AS m(id)'
                       ' WHERE NOT EXISTS (SELECT 1 FROM %I t WHERE t.id = m.id) LIMIT 1', p_table)
            INTO v_missing USING p_ids;
        RAISE foreign_key_violation USING
            MESSAGE = format('score rows reference %s %s, which does not exist', p_noun, v_missing),
            TABLE = 'reid_similarity_scores', COLUMN = p_column;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION reid_scores_check_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_detections bigint[];
    v_deer bigint[];
BEGIN
    SELECT array_agg(DISTINCT detection_id), array_agg(DISTINCT deer_id) INTO v_detections, v_deer FROM new_rows;
    IF v_detections IS NOT NULL THEN
        PERFORM reid_scores_require('detections', 'detection', 'detection_id', v_detections);
        PERFORM reid_scores_require('deer', 'deer', 'deer_id', v_deer);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION reid_scores_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'detections' THEN
        DELETE FROM reid_similarity_scores s USING old_rows o WHERE s.detection_id = o.id;
    ELSE
        DELETE FROM reid_similarity_scores s USING old_rows o WHERE s.deer_id = o.id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER reid_scores_cascade
    AFTER DELETE ON detections REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_cascade();
CREATE OR REPLACE TRIGGER reid_scores_cascade
    AFTER DELETE ON deer REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reid_scores_cascade();
DROP FUNCTION IF EXISTS reid_scores_delete_for_detections();
DROP FUNCTION IF EXISTS reid_scores_delete_for_deer();

-- The first 006 did not make these checks deferrable (batch/demo_data.py no longer needs them deferred, but
-- a deferrable check is what today's 006 gives a fresh database).
ALTER TABLE detections ALTER CONSTRAINT detections_deer_id_fkey DEFERRABLE INITIALLY IMMEDIATE;
ALTER TABLE deer ALTER CONSTRAINT deer_merged_into_fkey DEFERRABLE INITIALLY IMMEDIATE;

-- 2. Review audit rows outlive the detections, deer, keys and sites they describe.
--
-- Deleting a detection used to delete its events (ON DELETE CASCADE) and a deer named by an event (a merge,
-- an assignment) could not be deleted, nor its site. The rows keep the ids with no foreign key, and the site
-- they belong to, so a key can still be scoped to them once the rows they name are gone.
ALTER TABLE review_events
    DROP CONSTRAINT IF EXISTS review_events_detection_id_fkey,
    DROP CONSTRAINT IF EXISTS review_events_deer_id_fkey,
    DROP CONSTRAINT IF EXISTS review_events_api_key_id_fkey,
    ADD COLUMN site_id bigint;
UPDATE review_events e SET site_id = coalesce(
    (SELECT c.site_id FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id
     WHERE d.id = e.detection_id),
    (SELECT r.site_id FROM deer r WHERE r.id = coalesce(e.deer_id, e.to_deer_id, e.from_deer_id)));
ALTER TABLE review_events ALTER COLUMN site_id SET NOT NULL;

-- An event names a detection or a deer that exists when it is written (what the foreign keys checked) and
-- takes its site from it unless the writer gave one.
CREATE FUNCTION review_events_site() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.site_id IS NULL THEN
        SELECT c.site_id INTO NEW.site_id FROM detections d JOIN images i ON i.id = d.image_id
            JOIN cameras c ON c.id = i.camera_id WHERE d.id = NEW.detection_id;
    END IF;
    IF NEW.site_id IS NULL THEN
        SELECT r.site_id INTO NEW.site_id FROM deer r WHERE r.id = coalesce(NEW.deer_id, NEW.to_deer_id, NEW.from_deer_id);
    END IF;
    IF NEW.site_id IS NULL THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('review event names detection %s and deer %s, neither of which exists',
                             NEW.detection_id, coalesce(NEW.deer_id, NEW.to_deer_id, NEW.from_deer_id)),
            TABLE = 'review_events', COLUMN = 'site_id';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER review_events_site BEFORE INSERT ON review_events
    FOR EACH ROW EXECUTE FUNCTION review_events_site();

-- 3. A site is deleted with one plain DELETE, merges and assignments included.
--
-- The cascade reached the site's deer before their detections, so a deer still assigned to one refused the
-- delete. Its detections go first; then its deer (merged ones too) go in one statement.
CREATE FUNCTION sites_delete_detections_first() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM detections d USING images i, cameras c
    WHERE d.image_id = i.id AND i.camera_id = c.id AND c.site_id = OLD.id;
    RETURN OLD;
END;
$$;

CREATE TRIGGER sites_delete_detections_first BEFORE DELETE ON sites
    FOR EACH ROW EXECUTE FUNCTION sites_delete_detections_first();

-- 4. Which model made a detection's stored embedding, apart from the model that made its decision
-- (model_version: Camtrap DP classifiedBy, the scores the review queue shows). A gallery refresh under a new
-- model re-embeds gallery detections and records it here. NULL: the embedding is model_version's, as the
-- online path stores both together.
ALTER TABLE detections ADD COLUMN embedding_model_version text;
