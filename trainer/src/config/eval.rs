//! `[eval]`: zero-shot classification, retrieval and validation loss.

use ferroclip_data::section::Range;
ferroclip_data::config_section! {
    /// `[eval]`
    pub struct EvalConfig {
        /// Zero-shot data: a folder of class sub-folders (`root/<class>/<image>`), or shards with an
        /// image, a caption and a `cls` member (the class index).
        pub zeroshot_data: String = "",
        /// Class names. For a class-folder set: lines `folder<TAB>class name` (or `class name` for a
        /// folder of that name), matched to the folders by name, in any order; `""`: each folder's
        /// name is its class name. For `cls` shards: one name per line in index order (the part after
        /// a tab if any); `""`: the ImageNet-1k names.
        pub zeroshot_classnames: String = "",
        /// Prompt templates, one per line with `{}`; `""` uses the 80 OpenAI templates.
        pub zeroshot_templates: String = "",
        /// Image–caption shards, or a folder of images with `captions.tsv`, for recall@k.
        pub retrieval_data: String = "",
        /// Held-out shards for the validation loss.
        pub val_data: String = "",
        /// Evaluate every N optimizer steps during training (and always at the end); 0 only at the end.
        pub every_steps: u64 = 0,
        /// Images, or prompts, per forward pass.
        pub batch_size: usize = 64 => Range::closed(1.0, 1048576.0),
    }
}

impl EvalConfig {
    /// Whether anything is to be evaluated.
    pub fn any(&self) -> bool {
        !(self.zeroshot_data.is_empty() && self.retrieval_data.is_empty() && self.val_data.is_empty())
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        super::check_ranges("eval", self)?;
        let zero_shot_lists =
            [("zeroshot_classnames", &self.zeroshot_classnames), ("zeroshot_templates", &self.zeroshot_templates)];
        for (key, value) in zero_shot_lists {
            if !value.is_empty() && self.zeroshot_data.is_empty() {
                return Err(format!("key `eval.{key}`: set, but eval.zeroshot_data is empty (nothing would use it)"));
            }
        }
        Ok(())
    }
}
