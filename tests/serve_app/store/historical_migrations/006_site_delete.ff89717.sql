-- Deleting a site cascades to its deer, whose triggers bump the site's gallery version: the bump
-- then inserted a gallery_versions row for the site being deleted and the whole DELETE failed with a
-- foreign key violation. A site that no longer exists has no gallery to bump.
CREATE OR REPLACE FUNCTION bump_gallery_version(p_site_id bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO gallery_versions (site_id, version)
    SELECT p_site_id, nextval('gallery_version_seq') WHERE EXISTS (SELECT 1 FROM sites WHERE id = p_site_id)
    ON CONFLICT (site_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now();
$$;

-- Deleting a site deletes its deer and (through cameras and images) their detections in one statement,
-- but the checks that a deer still referenced by a detection, a merge or a review event cannot go ran
-- before the cascade had reached those rows. They stay immediate for everything else; a whole-site
-- delete runs `SET CONSTRAINTS ... DEFERRED` (see batch/demo_data.py) so they are checked at commit,
-- when the referencing rows are gone too.
ALTER TABLE detections ALTER CONSTRAINT detections_deer_id_fkey DEFERRABLE INITIALLY IMMEDIATE;
ALTER TABLE deer ALTER CONSTRAINT deer_merged_into_fkey DEFERRABLE INITIALLY IMMEDIATE;
ALTER TABLE review_events ALTER CONSTRAINT review_events_deer_id_fkey DEFERRABLE INITIALLY IMMEDIATE;
