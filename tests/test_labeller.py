"""Known answers for the rule-based CheXpert sentence labeller and the sentence meanings (docs/labeller.md)."""
import pytest

import modeling_cgns
from modeling_cgns.labeller import (
    OBSERVATIONS,
    label_sentence,
    label_sentences,
    meaning_ids,
    meaning_key,
    normalise_text,
    report_labels,
    sentence_meanings,
)
from modeling_cgns.sentences import split_sentences

# (sentence, expected labels); every one of the 14 observations appears positive and negative or uncertain
KNOWN = [
    # No Finding: global normal statements
    ("No acute cardiopulmonary process.", {"No Finding": 1}),
    ("The lungs are clear.", {"No Finding": 1}),
    ("Normal chest x-ray.", {"No Finding": 1}),
    ("Lungs are clear except for left basilar atelectasis.", {"Atelectasis": 1}),
    ("The lungs are clear of consolidation.", {"Consolidation": 0}),
    # Enlarged Cardiomediastinum
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": 1}),
    ("Mediastinal contours are within normal limits.", {"Enlarged Cardiomediastinum": 0}),
    ("The cardiomediastinal silhouette is within normal limits.", {"Enlarged Cardiomediastinum": 0, "Cardiomegaly": 0}),
    # Cardiomegaly
    ("Moderate cardiomegaly.", {"Cardiomegaly": 1}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0}),
    ("Heart size is upper limits of normal.", {"Cardiomegaly": 0}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": 1}),
    ("No change in the moderate cardiomegaly.", {"Cardiomegaly": 1}),
    # Lung Opacity
    ("Patchy opacity in the right lower lobe.", {"Lung Opacity": 1}),
    ("Questionable right middle lobe opacity.", {"Lung Opacity": -1}),
    ("Retrocardiac opacity, likely atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    # Lung Lesion
    ("Spiculated mass in the left upper lobe, concerning for malignancy.", {"Lung Lesion": 1}),
    ("No pulmonary nodules are identified.", {"Lung Lesion": 0}),
    ("Suspicious for a right hilar mass.", {"Lung Lesion": -1}),
    ("Calcified granuloma in the right upper lobe.", {}),
    # Edema
    ("Mild pulmonary edema.", {"Edema": 1}),
    ("Pulmonary edema has resolved.", {"Edema": 0}),
    # Consolidation and Pneumonia
    ("Focal consolidation in the left lower lobe.", {"Consolidation": 1}),
    ("No focal consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0}),
    ("Right lower lobe pneumonia.", {"Pneumonia": 1}),
    ("Findings may represent early pneumonia.", {"Pneumonia": -1}),
    ("Residuals of prior granulomatous infection.", {}),
    # Atelectasis
    ("Bibasilar atelectasis.", {"Atelectasis": 1}),
    ("Atelectasis versus pneumonia at the left base.", {"Atelectasis": -1, "Pneumonia": -1}),
    # Pneumothorax
    ("Small right apical pneumothorax.", {"Pneumothorax": 1}),
    ("Pneumothorax is not seen.", {"Pneumothorax": 0}),
    ("Negative for pneumothorax.", {"Pneumothorax": 0}),
    # Pleural Effusion
    ("Small bilateral pleural effusions.", {"Pleural Effusion": 1}),
    ("Pleural effusion cannot be excluded.", {"Pleural Effusion": -1}),
    ("Cannot exclude small left effusion.", {"Pleural Effusion": -1}),
    ("Free of pleural effusion.", {"Pleural Effusion": 0}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": -1}),
    ("Small pericardial effusion.", {}),
    # Pleural Other
    ("Left apical pleural thickening.", {"Pleural Other": 1}),
    # Fracture
    ("Healed right rib fractures.", {"Fracture": 1}),
    ("No acute fracture.", {"Fracture": 0}),
    ("The lateral most screw is fractured.", {"Support Devices": 1}),
    # Support Devices
    ("Dual-chamber pacemaker with leads in the right atrium and right ventricle.", {"Support Devices": 1}),
    ("The endotracheal tube has been removed.", {"Support Devices": 0}),
    ("Interval removal of the right chest tube.", {"Support Devices": 0}),
    # several observations, and clause boundaries
    ("No pneumothorax or pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 0}),
    ("Cardiomegaly with mild pulmonary edema and small bilateral effusions.",
     {"Cardiomegaly": 1, "Edema": 1, "Pleural Effusion": 1}),
    ("There is no pneumothorax, but a small left effusion is present.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("No pleural effusion; small right apical pneumothorax.", {"Pneumothorax": 1, "Pleural Effusion": 0}),
    ("Bibasilar opacities which may represent atelectasis versus pneumonia.",
     {"Lung Opacity": 1, "Atelectasis": -1, "Pneumonia": -1}),
    ("Possible small left pleural effusion, no pneumothorax.", {"Pleural Effusion": -1, "Pneumothorax": 0}),
    ("Degenerative changes of the thoracic spine.", {}),
]


@pytest.mark.parametrize("sentence, expected", KNOWN, ids=[k[0][:40] for k in KNOWN])
def test_known_answers(sentence, expected):
    assert label_sentence(sentence) == expected


def test_every_observation_is_covered_by_the_known_answers():
    positive = {o for _, labels in KNOWN for o, v in labels.items() if v == 1}
    not_positive = {o for _, labels in KNOWN for o, v in labels.items() if v != 1}
    assert positive == set(OBSERVATIONS)
    assert not_positive >= set(OBSERVATIONS) - {"No Finding", "Pleural Other"}


def test_public_entry_point_and_order():
    sentences = [k[0] for k in KNOWN]
    out = modeling_cgns.label_sentences(sentences)
    assert out == [k[1] for k in KNOWN]
    for labels in out:  # keys in CheXpert order, values in {1, 0, -1}
        assert list(labels) == [o for o in OBSERVATIONS if o in labels]
        assert set(labels.values()) <= {1, 0, -1}


def test_split_sentences_form_gets_the_same_labels():
    """Pretraining sentences are lower-case and punctuation-free; commas never change a label."""
    for sentence, expected in KNOWN:
        if ";" in sentence:
            continue  # the splitter drops the clause boundary ";"
        pieces = split_sentences(sentence)
        assert len(pieces) == 1
        assert label_sentence(pieces[0]) == expected, pieces[0]


def test_negation_before_and_after_the_mention():
    before = ["No pneumothorax.", "Without pneumothorax.", "There is no evidence of pneumothorax.",
              "Negative for pneumothorax.", "Free of pneumothorax.", "Resolution of the pneumothorax."]
    after = ["Pneumothorax is not seen.", "Pneumothorax has resolved.", "Pneumothorax is no longer seen.",
             "Pneumothorax is absent.", "The pneumothorax is not identified."]
    assert label_sentences(before + after) == [{"Pneumothorax": 0}] * (len(before) + len(after))
    # a negation does not reach across a verb into a new statement
    assert label_sentence("No effusion is seen the heart is enlarged") == {"Cardiomegaly": 1, "Pleural Effusion": 0}


def test_uncertainty_before_and_after_the_mention():
    before = ["Possible pneumonia.", "Cannot exclude pneumonia.", "Findings concerning for pneumonia.",
              "Opacity suggestive of pneumonia.", "Questionable pneumonia.", "Atelectasis versus pneumonia."]
    after = ["Pneumonia cannot be excluded.", "Pneumonia is not ruled out.", "Pneumonia is suspected.",
             "Pneumonia is possible."]
    for labels in label_sentences(before + after):
        assert labels["Pneumonia"] == -1


def test_no_finding_drops_when_a_pathology_is_stated():
    assert label_sentence("No acute cardiopulmonary process.") == {"No Finding": 1}
    # the global normal's "no" still negates what it lists
    assert label_sentence("No acute cardiopulmonary disease or effusion.") == {"No Finding": 1, "Pleural Effusion": 0}
    # a support device is not a pathology
    assert label_sentence("Normal chest; pacemaker in place.") == {"No Finding": 1, "Support Devices": 1}


def test_report_labels():
    sentences = [{"No Finding": 1}, {"Pleural Effusion": -1}, {"Pneumothorax": 0}, {"Support Devices": 1}]
    zeros = report_labels(sentences)
    assert zeros["Pleural Effusion"] == 0 and zeros["Support Devices"] == 1 and zeros["No Finding"] == 1
    assert set(zeros) == set(OBSERVATIONS)
    ones = report_labels(sentences, uncertain_as=1)
    assert ones["Pleural Effusion"] == 1 and ones["No Finding"] == 0
    assert report_labels([{"Cardiomegaly": 1}, {"No Finding": 1}])["No Finding"] == 0
    assert report_labels([]) == {**{o: 0 for o in OBSERVATIONS}, "No Finding": 1}
    with pytest.raises(ValueError, match="uncertain_as"):
        report_labels(sentences, uncertain_as=-1)


def test_meanings_group_paraphrases_and_keep_polarity_apart():
    sentences = ["No pneumothorax.", "There is no evidence of pneumothorax.", "no pneumothorax",
                 "Small right pneumothorax.", "Pneumothorax cannot be excluded.",
                 "Degenerative changes of the thoracic spine.", "degenerative changes of the  thoracic spine",
                 "Mild scoliosis.", "No pneumothorax or pleural effusion.", "No pleural effusion or pneumothorax."]
    meanings = sentence_meanings(sentences)
    assert meanings[0] == meanings[1] == meanings[2] == "Pneumothorax=0"
    assert meanings[3] == "Pneumothorax=1" and meanings[4] == "Pneumothorax=-1"
    assert meanings[5] == meanings[6] == "text:degenerative changes of the thoracic spine"
    assert meanings[7] == "text:mild scoliosis"
    assert meanings[8] == meanings[9] == "Pneumothorax=0|Pleural Effusion=0"
    ids, vocab = meaning_ids(meanings)
    assert ids == [0, 0, 0, 1, 2, 3, 3, 4, 5, 5]
    assert [vocab[i] for i in ids] == meanings
    assert modeling_cgns.sentence_meanings is sentence_meanings and modeling_cgns.meaning_ids is meaning_ids


def test_meaning_key_and_normalise_text():
    assert meaning_key({"Pleural Effusion": 0, "Cardiomegaly": 1}, "x") == "Cardiomegaly=1|Pleural Effusion=0"
    assert meaning_key({}, "  The Aorta is TORTUOUS!! ") == "text:the aorta is tortuous"
    assert normalise_text("Right-sided  PICC, tip in SVC.") == "right sided picc tip in svc"


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="list of sentences"):
        label_sentences("No pneumothorax.")
    with pytest.raises(TypeError, match="must be a str"):
        label_sentences(["No pneumothorax.", None])
    assert label_sentences(["", "   ", "..."]) == [{}, {}, {}]
