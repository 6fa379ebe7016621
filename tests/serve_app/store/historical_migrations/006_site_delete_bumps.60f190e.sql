-- Deleting a site cascades to its deer, whose triggers bump the site's gallery version: the bump
-- then inserted a gallery_versions row for the site being deleted and the whole DELETE failed with a
-- foreign key violation. A site that no longer exists has no gallery to bump.
CREATE OR REPLACE FUNCTION bump_gallery_version(p_site_id bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO gallery_versions (site_id, version)
    SELECT p_site_id, nextval('gallery_version_seq') WHERE EXISTS (SELECT 1 FROM sites WHERE id = p_site_id)
    ON CONFLICT (site_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now();
$$;
